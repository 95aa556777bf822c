"""PGConfig: every field documented, YAML + key=value overrides, one clear error listing every problem; the CLI."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from hfpg import ConfigError, PGConfig
from hfpg.cli import main


def test_every_field_has_a_one_line_doc():
    for f in dataclasses.fields(PGConfig):
        doc = f.metadata.get("help", "")
        assert doc and "\n" not in doc, f.name


def test_defaults_are_valid_and_documented_yaml_round_trips():
    text = PGConfig.documented_yaml()
    assert "# Discount γ over response tokens." in text
    assert PGConfig.from_dict(yaml.safe_load(text)) == PGConfig()


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 3e-6\nppo_epochs: 2\nreport_to: tensorboard\nstop_token_ids: [5, 7]\n")
    cfg = PGConfig.from_yaml(path, overrides=["ppo_epochs=3", "target_approx_kl=0.1", "max_grad_norm=null"])
    assert cfg.learning_rate == 3e-6 and isinstance(cfg.learning_rate, float)  # YAML reads 3e-6 as a string
    assert cfg.ppo_epochs == 3 and cfg.target_approx_kl == 0.1 and cfg.max_grad_norm is None
    assert cfg.report_to == ["tensorboard"] and cfg.stop_token_ids == [5, 7]
    saved = tmp_path / "saved.yaml"
    cfg.to_yaml(saved)
    assert PGConfig.from_yaml(saved) == cfg


def test_unknown_keys_get_a_did_you_mean():
    with pytest.raises(ConfigError, match="unknown key 'lerning_rate'; did you mean 'learning_rate'"):
        PGConfig.from_dict({"lerning_rate": 1e-5})
    with pytest.raises(ConfigError, match="unknown key 'zzz'; see `hfpg config`"):
        PGConfig.from_dict({}, overrides=["zzz=1"])


def test_all_problems_are_reported_in_one_error():
    with pytest.raises(ConfigError) as err:
        PGConfig.from_dict(
            {
                "lerning_rate": 1,
                "gamma": 1.5,
                "mini_batch_size": 5,
                "kl_estimator": "k9",
                "ppo_epochs": "two",
                "top_p": 0,
            }
        )
    msg = str(err.value)
    for part in (
        "lerning_rate",
        "gamma=1.5 must lie in [0, 1]",
        "not a multiple of mini_batch_size=5",
        "kl_estimator='k9' is not one of ['k1', 'k2', 'k3']",
        "ppo_epochs='two' must be an integer",
        "top_p=0.0 must lie in (0, 1]",
    ):
        assert part in msg, part
    assert len(err.value.problems) == 6


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": 0},
        {"max_new_tokens": 0},
        {"clip_range": -0.1},
        {"lam": 2},
        {"learning_rate": -1},
        {"min_new_tokens": 40, "max_new_tokens": 8},
        {"forward_batch_size": 0},
        {"algorithm": "a2c"},
        {"mixed_precision": "fp8"},
        {"adaptive_kl": "yes"},
        {"max_steps": 1.5},
    ],
)
def test_out_of_range_values_are_rejected(bad):
    with pytest.raises(ConfigError):
        PGConfig(**bad) if "adaptive_kl" not in bad and "max_steps" not in bad else PGConfig.from_dict(bad)


def test_batch_sizes_must_divide_over_processes_and_accumulation():
    cfg = PGConfig(rollout_batch_size=16, mini_batch_size=8, gradient_accumulation_steps=2)
    assert cfg.num_mini_batches == 2
    cfg.check_for(num_processes=4)  # 8 = 4 processes × 2 micro-batches × 1
    with pytest.raises(ConfigError, match=r"multiple of num_processes \(3\) × gradient_accumulation_steps \(2\)"):
        cfg.check_for(num_processes=3)
    with pytest.raises(ConfigError, match=r"pick e\.g\. mini_batch_size=5"):
        PGConfig(rollout_batch_size=10, mini_batch_size=6)


def test_cli_prints_documented_defaults(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "clip_range: 0.2" in out and "# PPO ratio clip" in out


def test_cli_validates_a_file_with_overrides(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("ppo_epochs: 2\n")
    assert main(["config", str(path), "vf_coef=0.5"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["ppo_epochs"] == 2 and out["vf_coef"] == 0.5
    assert main(["config", "vf_coef=0.5", "--num-processes", "3"]) == 2
    assert "multiple of num_processes (3)" in capsys.readouterr().err


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    assert main(["config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["config", "gamma=3", "clip_rnge=0.1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'clip_range'" in err and "gamma=3.0 must lie in [0, 1]" in err and "Traceback" not in err
