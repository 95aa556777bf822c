"""Accelerate launch configs, DeepSpeed / FSDP2 handling (hfpg/distributed.py) and launch checks."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import torchrun

from hfpg import PGConfig
from hfpg.algorithms import build_algorithm
from hfpg.config import ConfigError
from hfpg.distributed import (
    accelerator_kwargs,
    check_backend,
    check_launch,
    configure_deepspeed,
    full_weights,
    sharding,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"


def fake_accelerator(
    kind: str, zero_stage: int = 3, fsdp_version: int = 2, ds_config: dict | None = None, num_processes: int = 2
):
    state = SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage, deepspeed_config=ds_config or {}),
        fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version, reshard_after_forward=True),
    )
    dtype = {"deepspeed": DistributedType.DEEPSPEED, "fsdp": DistributedType.FSDP, "ddp": DistributedType.MULTI_GPU}[
        kind
    ]
    return SimpleNamespace(
        distributed_type=dtype, state=state, num_processes=num_processes, unwrap_model=lambda m: getattr(m, "module", m)
    )


# ---- recipes/accelerate ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kind",
    [("ddp", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero3", "DEEPSPEED"), ("fsdp", "FSDP")],
)
def test_accelerate_configs_parse_with_accelerates_own_loader(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))  # unknown keys raise
    assert str(cfg.distributed_type).endswith(kind)
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])
        # batch keys are left to hfpg (configure_deepspeed fills them from the recipe)
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(cfg.deepspeed_config)
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2


def test_readme_shows_a_launch_command_for_every_config():
    readme = (ROOT / "README.md").read_text()
    for path in sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")):
        assert f"--config_file recipes/accelerate/{path.name}" in readme, path.name


# ---- DeepSpeed batch keys, refused combinations ---------------------------------------------------------------------
def test_configure_deepspeed_fills_the_batch_keys_from_the_hfpg_config():
    cfg = PGConfig(rollout_batch_size=32, mini_batch_size=16, gradient_accumulation_steps=2, max_grad_norm=0.5)
    ds = {"train_micro_batch_size_per_gpu": "auto"}
    configure_deepspeed(fake_accelerator("deepspeed", ds_config=ds), cfg)
    # 16 sequences per optimizer step = 2 processes × 2 micro-batches × 4
    assert ds == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 16,
        "gradient_clipping": 0.5,
    }


def test_configure_deepspeed_refuses_a_conflicting_explicit_value():
    cfg = PGConfig(rollout_batch_size=32, mini_batch_size=16, gradient_accumulation_steps=2)
    ds = {"gradient_accumulation_steps": 8}
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=8 but hfpg's batch settings need 2"):
        configure_deepspeed(fake_accelerator("deepspeed", ds_config=ds), cfg)


def test_configure_deepspeed_leaves_other_backends_alone():
    configure_deepspeed(fake_accelerator("ddp"), PGConfig())  # no plugin config is touched (would KeyError)


@pytest.mark.parametrize(
    "kind,kw,algorithm,message",
    [
        ("deepspeed", {"zero_stage": 2}, "trpo", "algorithm=trpo"),
        ("fsdp", {}, "trpo", "algorithm=trpo"),
        ("fsdp", {"fsdp_version": 1}, "ppo", "FSDP1"),
    ],
)
def test_unsupported_combinations_are_refused_with_the_reason(kind, kw, algorithm, message):
    with pytest.raises(ConfigError, match=message):
        check_backend(fake_accelerator(kind, **kw), build_algorithm(PGConfig(algorithm=algorithm)))
    check_backend(fake_accelerator("ddp"), build_algorithm(PGConfig(algorithm="trpo")))  # TRPO on DDP is fine


def test_sharding_kinds():
    assert sharding(fake_accelerator("deepspeed", zero_stage=3)) == "zero3"
    assert sharding(fake_accelerator("deepspeed", zero_stage=2)) == "none"
    assert sharding(fake_accelerator("fsdp")) == "fsdp"
    assert sharding(fake_accelerator("ddp")) == "none"


def test_full_weights_uses_deepspeeds_gather_under_zero3(monkeypatch):
    """ZeRO-3: DeepSpeed's own unwrap_model_for_generation is entered with the engine, and exited afterwards."""
    events = []

    @contextlib.contextmanager
    def unwrap_model_for_generation(engine):
        events.append(("enter", engine))
        yield engine
        events.append(("exit", engine))

    zero = types.ModuleType("deepspeed.runtime.zero")
    zero.unwrap_model_for_generation = unwrap_model_for_generation
    for name in ("deepspeed", "deepspeed.runtime"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero", zero)
    engine = SimpleNamespace(module=torch.nn.Linear(2, 2))
    with full_weights(engine, fake_accelerator("deepspeed")) as model:
        assert model is engine.module and events == [("enter", engine)]
    assert events == [("enter", engine), ("exit", engine)]
    with full_weights(engine, fake_accelerator("deepspeed"), enabled=False) as model:  # gather_for_generation=false
        assert model is engine.module
    assert len(events) == 2


# ---- launching ----------------------------------------------------------------------------------------------------
def test_a_launch_whose_processes_did_not_join_one_group_stops_with_the_fix(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="accelerate launch --cpu"):
        check_launch(SimpleNamespace(num_processes=1))
    check_launch(SimpleNamespace(num_processes=2))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(SimpleNamespace(num_processes=1))


@pytest.mark.skipif(torch.accelerator.is_available(), reason="a machine with an accelerator uses it")
def test_torchrun_on_a_cpu_machine_joins_a_gloo_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert accelerator_kwargs() == {"cpu": True}
    monkeypatch.delenv("WORLD_SIZE")
    assert accelerator_kwargs() == {}


def test_python_dash_m_hfpg_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "hfpg", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout


# ---- real sharded policies on CPU (2 processes, gloo) --------------------------------------------------------------
def _torchrun(script: Path, out: Path, extra_env: dict | None = None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    torchrun(str(script), str(out), env=env)
    prefix = script.stem.split("_")[0]
    return [json.loads((out / f"{prefix}.rank{r}.json").read_text()) for r in (0, 1)]


def test_fsdp2_policy_is_gathered_once_for_sampling_and_resharded(tmp_path):
    for r in _torchrun(SCRIPTS / "fsdp2_full_weights.py", tmp_path):
        assert r["kind"] == "fsdp" and r["sharded_before"]
        assert r["gathered"] and r["full_shapes"] and r["still_full_after_generate"]
        assert r["same_samples"]  # sampling from the gathered policy == sampling from the unsharded one
        assert r["sharded_after"]


def test_zero3_policy_is_gathered_once_for_sampling_and_repartitioned(tmp_path):
    if os.environ.get("HFPG_REQUIRE_DEEPSPEED"):  # `make test-deepspeed`: a missing deepspeed is a failure
        import deepspeed  # noqa: F401
    else:
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: make test-deepspeed")
    for r in _torchrun(SCRIPTS / "zero3_full_weights.py", tmp_path):
        assert r["kind"] == "zero3" and r["partitioned_before"]
        assert r["gathered"] and r["same_samples"] and r["same_samples_layer_by_layer"]
        assert r["partitioned_after"]
