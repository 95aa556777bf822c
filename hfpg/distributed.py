"""What the loop does differently when the policy is spread over processes (DDP) or sharded (ZeRO-3, FSDP2).

DDP needs nothing here: every process holds the whole model, reductions live in ``algorithms/common.py``.

Sharded policies: generation samples one token at a time, and a ZeRO-3 or FSDP forward all-gathers each layer's
shards and frees them again — once per generated token, which makes sampling tens of times slower than the update.
:func:`full_weights` gathers the whole policy once for the rollout (generation, policy and reference forwards) and
for saving, then re-shards it. The price: one full copy of the policy on each device while it is held (TRL and
DeepSpeed-Chat gather the same way). ``gather_for_generation: false`` in the config keeps the layer-by-layer path for
models too big for that.
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule

from .errors import ConfigError


def launched_processes() -> int:
    """WORLD_SIZE set by torchrun / accelerate launch (1 when started as a plain script)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def accelerator_kwargs() -> dict:
    """``cpu=True`` for a multi-process launch on a machine without an accelerator: Accelerate would otherwise run
    each process as its own single-process job (on CPU it only joins a gloo group when asked to)."""
    if launched_processes() > 1 and not torch.accelerator.is_available():
        return {"cpu": True}
    return {}


def check_launch(accelerator) -> None:
    """A launcher started N processes but they did not join one group: every one would train alone on the same
    output directory. Stop with the fix instead."""
    n = launched_processes()
    if n > 1 and accelerator.num_processes != n:
        raise RuntimeError(
            f"launched with WORLD_SIZE={n} but Accelerate formed a group of "
            f"{accelerator.num_processes}: on CPU use `accelerate launch --cpu` "
            "(or ACCELERATE_USE_CPU=1); on GPUs check that each process sees a device "
            "(CUDA_VISIBLE_DEVICES)"
        )


def sharding(accelerator) -> str:
    """ "zero3" (DeepSpeed stage 3), "fsdp" (FSDP2), "fsdp1", or "none" (one process, DDP, ZeRO-1/2)."""
    state = accelerator.state
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "zero3" if state.deepspeed_plugin.zero_stage == 3 else "none"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp" if getattr(state.fsdp_plugin, "fsdp_version", 1) == 2 else "fsdp1"
    return "none"


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def check_backend(accelerator, algorithm) -> None:
    """Refuse the combinations that cannot run, with the reason, before any model is prepared. ``algorithm``: the
    :class:`~hfpg.algorithms.UpdateRule` of the run."""
    problems = []
    if sharding(accelerator) == "fsdp1":
        problems.append(
            "FSDP1 is not supported: set `fsdp_version: 2` in the Accelerate config (recipes/accelerate/fsdp.yaml does)"
        )
    engine = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if engine and algorithm.sharded_engine_refusal:
        problems.append(algorithm.sharded_engine_refusal)
    if problems:
        raise ConfigError("; ".join(problems), problems)


def configure_deepspeed(accelerator, config) -> None:
    """Fill the DeepSpeed config's batch keys from hfpg's, which define them: DeepSpeed's micro batch is one
    gradient-accumulation micro-batch of one process's share of a minibatch, and clipping follows max_grad_norm.

    Values set explicitly in the DeepSpeed config must agree; a mismatch is an error rather than a silent override.
    """
    if not is_deepspeed(accelerator):
        return
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    P, ga = accelerator.num_processes, config.gradient_accumulation_steps
    wanted = {
        "train_micro_batch_size_per_gpu": config.mini_batch_size // P // ga,
        "gradient_accumulation_steps": ga,
        "train_batch_size": config.mini_batch_size,
        "gradient_clipping": float(config.max_grad_norm or 0.0),
    }
    problems = []
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif float(have) != float(value):
            problems.append(
                f"DeepSpeed config {key}={have} but hfpg's batch settings need {value}: set it to "
                f"'auto' (recipes/accelerate/deepspeed_zero*.yaml do) or change the hfpg config"
            )
    if problems:
        raise ConfigError("; ".join(problems), problems)


@contextlib.contextmanager
def full_weights(model, accelerator, enabled: bool = True):
    """Yields the unwrapped policy with every weight present on this process; re-shards on exit.

    ZeRO-3: DeepSpeed's own ``unwrap_model_for_generation`` (gather all parameters, pause the per-layer fetch/release
    hooks). FSDP2: unshard every FSDP module and keep it unsharded through forwards. Otherwise (or with
    ``enabled=False``) it is just ``accelerator.unwrap_model``. Every process must enter it together (collectives).
    """
    unwrapped = accelerator.unwrap_model(model)
    kind = sharding(accelerator) if enabled else "none"
    if kind == "zero3":
        from deepspeed.runtime.zero import unwrap_model_for_generation  # an optional extra: imported when used

        with unwrap_model_for_generation(model):
            yield unwrapped
    elif kind == "fsdp":
        reshard = getattr(accelerator.state.fsdp_plugin, "reshard_after_forward", True)
        units = [m for m in unwrapped.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield unwrapped
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(bool(reshard), recurse=False)
    else:
        yield unwrapped
