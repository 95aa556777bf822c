"""Reward-model training (reward_models/, `hfpg train-rm`): losses, learning, save -> RewardModelReward, bad data."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer
from huggingface_hub import ModelCard
from transformers import BertConfig, BertForSequenceClassification

from hfpg import ConfigError, DataError, RewardModelReward
from hfpg.cli import main
from hfpg.reward_modeling import RMConfig, bradley_terry_loss, train_reward_model

GOOD = ["good", "good day", "good food and good friends", "a good dog", "the good mat", "good world"]
BAD = ["bad", "a bad day", "bad food", "the dog is bad", "bad cat", "bad log and bad mat"]


def test_bradley_terry_loss_matches_hand_values():
    chosen, rejected, margin = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0])
    # -log sigmoid(x) = log(1 + e^-x): x = 0.5 and x = -1
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.0))) / 2
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(expected, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(
        (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2, abs=1e-6
    )


@pytest.fixture
def backbone(tmp_path):
    """A tiny random BERT (an encoder backbone with a pooler) and the test tokenizer, saved like a Hub checkpoint."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
            num_labels=2,
        )
    )
    path = tmp_path / "backbone"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def pairs(n, offset=0):
    return [
        {
            "prompt": "say something:",
            "chosen": f"{GOOD[(i + offset) % 6]} {i}",
            "rejected": f"{BAD[(i * 5 + offset) % 6]} {i}",
        }
        for i in range(n)
    ]


def rm_config(tmp_path, backbone, train, validation, **overrides) -> RMConfig:
    raw = {
        "model": {"name_or_path": backbone},
        "data": {"path": "json", "data_files": {"train": train, "validation": validation}, "eval_split": "validation"},
        "output_dir": str(tmp_path / "rm"),
        "learning_rate": 3e-3,
        "num_train_epochs": 6,
        "per_device_train_batch_size": 8,
        "eval_steps": 6,
        "logging_steps": 3,
        "report_to": [],
        "seed": 0,
        "max_length": 32,
        "early_stopping_patience": None,
    }
    raw.update(overrides)
    return RMConfig.from_dict(raw)


def test_pairwise_model_learns_a_separable_set_and_loads_into_reward_model_reward(tmp_path, backbone):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(48))
    val = write_jsonl(tmp_path / "val.jsonl", pairs(16, offset=3))
    result = train_reward_model(rm_config(tmp_path, backbone, train, val, input_format="concat"))
    assert result["metrics"]["eval_accuracy"] == 1.0
    assert result["metrics"]["eval_margin"] > 0
    final = result["paths"]["model"]
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "reward_normalization.json",
        "README.md",
        "hfpg_reward_model.yaml",
    ):
        assert os.path.isfile(os.path.join(final, name)), name

    prompts, texts = ["say something:"] * 4, ["good food", "bad food", "a good dog", "the dog is bad"]
    loaded = RewardModelReward(final, input_format="concat", max_length=32)
    in_memory = result["reward"]  # the scorer that trained, holding the best weights in memory
    assert loaded.raw_scores(prompts, texts) == in_memory.raw_scores(prompts, texts)  # identical, bit for bit
    norm = json.loads(Path(final, "reward_normalization.json").read_text())
    raw, normalized = loaded.raw_scores(prompts, texts), loaded(prompts, texts)
    assert normalized == pytest.approx([(r - norm["mean"]) / norm["std"] for r in raw])
    assert normalized[0] > normalized[1] and normalized[2] > normalized[3]
    held_out = [r["chosen"] for r in pairs(16, offset=3)] + [r["rejected"] for r in pairs(16, offset=3)]
    scores = torch.tensor(loaded(["say something:"] * 32, held_out))
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4) and scores.std().item() == pytest.approx(
        1.0, abs=1e-4
    )  # detail 16 on the held-out texts
    meta = ModelCard.load(os.path.join(final, "README.md")).data.to_dict()
    assert meta["library_name"] == "transformers" and "reward-model" in meta["tags"]
    assert meta["eval_metrics"]["accuracy"] == 1.0 and "base_model" not in meta  # a local backbone


def test_regression_on_ratings_correlates_on_held_out_texts(tmp_path, backbone):
    def rows(n, offset):
        out = []
        for i in range(n):
            k = (i + offset) % 4  # 0..3 "good" words: the rating
            words = ["good"] * k + ["the", "cat"][: 4 - k]
            out.append({"text": " ".join(words) + f" {i}", "score": float(k)})
        return out

    train = write_jsonl(tmp_path / "train.jsonl", rows(48, 0))
    val = write_jsonl(tmp_path / "val.jsonl", rows(16, 1))
    result = train_reward_model(
        rm_config(tmp_path, backbone, train, val, objective="regression", prompt_column=None, num_train_epochs=20)
    )
    assert result["metrics"]["eval_pearson"] > 0.9 and result["metrics"]["eval_spearman"] > 0.9


def test_cli_trains_with_early_stopping_tensorboard_and_clear_errors(tmp_path, backbone, capsys):
    write_jsonl(tmp_path / "train.jsonl", pairs(48))  # named relative to the config file below
    write_jsonl(tmp_path / "val.jsonl", pairs(16, offset=3))
    config = tmp_path / "rm.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"name_or_path": backbone},
                "output_dir": str(tmp_path / "out"),
                "data": {
                    "path": "json",
                    "data_files": {"train": "train.jsonl", "validation": "val.jsonl"},  # relative
                    "eval_split": "validation",
                },
                "learning_rate": 3e-3,
                "num_train_epochs": 20,
                "per_device_train_batch_size": 8,
                "eval_steps": 3,
                "early_stopping_patience": 2,
                "seed": 0,
                "max_length": 32,
            }
        )
    )
    assert main(["train-rm", str(config)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and str(tmp_path / "out" / "final") in out
    states = sorted((tmp_path / "out").glob("checkpoint-*/trainer_state.json"))
    state = json.loads(states[-1].read_text())
    assert state["global_step"] < 20 * 6  # stopped early: held-out accuracy stopped improving
    assert state["best_metric"] == 1.0
    assert list((tmp_path / "out").rglob("events.out.tfevents.*"))  # TensorBoard

    assert main(["train-rm", str(config), "learning_rat=1"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"prompt": "p", "chosen": "good", "rejected_text": "bad"}], "no column(s) ['rejected']"),
        ([{"prompt": "p", "chosen": "good", "rejected": "  "}], "row 0: rejected is empty"),
        (
            [
                {"prompt": "p", "chosen": "good", "rejected": "bad"},
                {"prompt": "p", "chosen": "same", "rejected": "same"},
            ],
            "row 1: chosen and rejected are identical",
        ),
    ],
    ids=["missing-column", "empty-string", "tie"],
)
def test_bad_preference_data_is_a_clear_error_before_training(tmp_path, backbone, rows, expected):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(
        DataError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        train_reward_model(rm_config(tmp_path, backbone, data, data))
    assert not (tmp_path / "rm").exists()  # nothing was trained or written


def test_bad_ratings_and_config_are_clear_errors(tmp_path, backbone):
    data = write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "score": 1.0}, {"text": "b", "score": float("nan")}])
    with pytest.raises(DataError, match="row 1: score=nan is not a finite number"):
        train_reward_model(rm_config(tmp_path, backbone, data, data, objective="regression"))
    with pytest.raises(ConfigError, match="objective='ranking' is not one of"):
        rm_config(tmp_path, backbone, data, data, objective="ranking")
    with pytest.raises(ConfigError, match="did you mean 'input_format'"):
        rm_config(tmp_path, backbone, data, data, input_fromat="pair")


def test_pkg_paths_reach_folders_inside_installed_packages():
    from hfpg.sources import resolve_source

    assert resolve_source("pkg:hfpg/rewards").endswith(os.path.join("hfpg", "rewards"))
    assert os.path.isfile(os.path.join(resolve_source("pkg:hfpg/rewards"), "models.py"))
    with pytest.raises(ConfigError, match="has no folder 'nope'"):
        resolve_source("pkg:hfpg/nope")
    with pytest.raises(ConfigError, match="not installed"):
        resolve_source("pkg:no_such_package_xyz/model")


def test_the_entry_script_in_reward_models_runs_like_the_cli(tmp_path, backbone):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    write_jsonl(tmp_path / "train.jsonl", pairs(16))
    write_jsonl(tmp_path / "val.jsonl", pairs(8, offset=3))
    config = tmp_path / "rm.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"name_or_path": backbone},
                "output_dir": str(tmp_path / "out"),
                "report_to": [],
                "data": {
                    "path": "json",
                    "data_files": {"train": "train.jsonl", "validation": "val.jsonl"},
                    "eval_split": "validation",
                },
                "num_train_epochs": 1,
                "eval_steps": 1,
                "max_length": 32,
            }
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "reward_models", "train_rm.py"),
            str(config),
            "per_device_train_batch_size=8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.rindex('{\n  "metrics"') :])  # after the Trainer's own log lines
    assert 0.0 <= result["metrics"]["eval_accuracy"] <= 1.0 and result["paths"]["model"].endswith("final")


def test_a_reward_model_folder_that_is_not_there_fails_when_the_reward_is_built(tmp_path):
    from hfpg.rewards.registry import build_reward

    with pytest.raises(ValueError, match="model folder 'outputs/rm/final' does not exist"):
        build_reward([{"name": "reward_model", "kwargs": {"model": "outputs/rm/final"}}], base_dir=str(tmp_path))
    reward = build_reward([{"name": "reward_model", "kwargs": {"model": "org/some-rm"}}])  # a Hub id loads lazily
    assert reward.names == ["reward_model"]
