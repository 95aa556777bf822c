"""Training configuration: one documented dataclass, loadable from YAML with ``key=value`` overrides.

Every problem found is reported in one :class:`ConfigError` before any model is loaded::

    config = PGConfig.from_yaml("my_run.yaml", overrides=["learning_rate=3e-6", "ppo_epochs=2"])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .algorithms import ALGORITHMS, rule_class
from .errors import ConfigError
from .forward import DEFAULT_LOGITS_CHUNK_SIZE
from .rewards.registry import spec_problems
from .schema import (
    apply_overrides,
    build_or_raise,
    coerce,
    folder_of,
    format_problems,
    loadable_fields,
    read_yaml,
    to_dict,
)
from .trl_names import TRL_KEY_HINTS

__all__ = ["ConfigError", "PGConfig"]


def _f(default, help: str, **kw):
    """A dataclass field whose one-line doc is kept in ``metadata['help']`` (shown by ``hfpg config --help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PGConfig:
    """Hyperparameters of a policy-gradient run. Batch sizes count sequences (prompt + completion)."""

    KEY_HINTS: ClassVar[dict] = TRL_KEY_HINTS  # TRL's names -> the hfpg setting, shown for those unknown keys

    # --- run --------------------------------------------------------------------------------------------------
    output_dir: str = _f("outputs/hfpg", "Where metrics, TensorBoard logs, checkpoints and the final model go.")
    seed: int = _f(0, "Random seed; process i uses seed + i so processes sample different completions.")
    algorithm: str = _f("ppo", f"Update rule: {' | '.join(ALGORITHMS)}.", choices=tuple(ALGORITHMS))
    advantage_estimator: str = _f(
        "gae",
        "gae (critic, GAE(γ, λ)) | returns (discounted Monte-Carlo returns minus a baseline).",
        choices=("gae", "returns"),
    )
    baseline: str = _f(
        "none",
        "Baseline for advantage_estimator=returns: none | moving_average | leave_one_out | group_norm | value.",
        choices=("none", "moving_average", "leave_one_out", "group_norm", "value"),
    )
    baseline_ema: float = _f(0.9, "Decay of the moving-average baseline (an EMA of sequence returns).")
    num_samples_per_prompt: int = _f(1, "Completions sampled per prompt in one batch (k; RLOO/group_norm need >= 2).")
    max_steps: int = _f(100, "Number of rollout -> reward -> update iterations.")
    prompt_column: str = _f("prompt", "Dataset column holding the prompt text; other columns reach the reward.")

    # --- batch sizes ------------------------------------------------------------------------------------------
    rollout_batch_size: int = _f(16, "Sequences generated per step, summed over all processes.")
    mini_batch_size: int = _f(8, "Sequences per optimizer step, summed over all processes.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step on each process (same update).")
    forward_batch_size: int | None = _f(
        None, "Sequences per no-grad forward during rollout on each process (None = the whole local batch)."
    )
    logits_chunk_size: int | None = _f(
        DEFAULT_LOGITS_CHUNK_SIZE,
        "Response tokens whose vocabulary logits exist at once in a forward, recomputed in backward (None = all).",
    )
    ppo_epochs: int = _f(4, "Passes over each rollout batch, each with a fresh permutation.")

    # --- optimisation -----------------------------------------------------------------------------------------
    learning_rate: float = _f(1e-5, "AdamW learning rate (policy and value head).")
    lr_scheduler_type: str = _f(
        "linear", "transformers scheduler name.", choices=("linear", "cosine", "constant", "constant_with_warmup")
    )
    warmup_steps: int = _f(0, "Optimizer steps of linear warm-up.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float | None = _f(1.0, "Clip the global gradient norm to this (None = no clipping).")
    max_nonfinite_steps: int = _f(
        3,
        "Stop with an error after this many consecutive updates that skipped an optimizer step on a non-finite "
        "loss or gradient (0 = never stop).",
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    mixed_precision: str = _f("no", "Accelerate mixed precision.", choices=("no", "fp16", "bf16"))
    fuse_policy_forward: bool = _f(
        True,
        "When an update is one optimizer step over the whole batch (REINFORCE or ppo_epochs=1, one minibatch, "
        "no accumulation/replay), take the rollout's old logprobs from the update's forward: one forward fewer.",
    )
    gather_for_generation: bool = _f(
        True,
        "ZeRO-3 / FSDP: gather the full policy once per rollout instead of layer by layer for every token "
        "(fast; needs one full copy of the weights per device while sampling).",
    )

    # --- PPO ----------------------------------------------------------------------------------------------------
    clip_range: float = _f(0.2, "PPO ratio clip ε: the surrogate uses clip(r, 1-ε, 1+ε).")
    clip_range_high: float | None = _f(
        None, "Upper ratio clip ε_high: clip(r, 1-ε, 1+ε_high), DAPO's clip-higher (None = clip_range)."
    )
    clip_range_value: float = _f(0.2, "Value clip ε_v around the rollout's values.")
    vf_coef: float = _f(0.1, "Weight of the value loss.")
    ent_coef: float = _f(0.0, "Weight of the entropy bonus (0 = off).")
    gamma: float = _f(1.0, "Discount γ over response tokens.")
    lam: float = _f(0.95, "GAE λ: 1 = Monte-Carlo returns, 0 = one-step TD.")
    whiten_advantages: bool | None = _f(
        None,
        "Whiten advantages over real tokens of the global batch (None = auto: false for RLOO's leave_one_out "
        "baseline, true otherwise).",
    )
    target_approx_kl: float | None = _f(
        None, "Stop the current update early once the policy's approx KL to the rollout exceeds this."
    )
    loss_type: str = _f(
        "dapo",
        "How token losses become a minibatch loss: dapo (sum / real tokens of the global minibatch) | grpo (mean "
        "over each sequence's tokens, then over sequences) | dr_grpo (sum / (sequences × max_new_tokens)).",
        choices=("dapo", "grpo", "dr_grpo"),
    )
    mask_truncated_completions: bool = _f(
        False, "Leave completions that hit max_new_tokens without a stop token out of the loss (DAPO's overlong mask)."
    )
    dynamic_sampling: bool = _f(
        False,
        "Drop prompt groups whose k samples all scored the same and sample new prompts to refill the batch (DAPO).",
    )
    dynamic_sampling_max_rounds: int = _f(
        3, "Extra generation rounds dynamic_sampling may take per step; then equal-score groups fill what is missing."
    )
    importance_sampling_level: str = _f(
        "token",
        "PPO ratio per token | per sequence: exp(mean log-ratio of its tokens) for every token (GSPO).",
        choices=("token", "sequence"),
    )

    # --- TRPO -----------------------------------------------------------------------------------------------------
    max_kl: float = _f(0.01, "TRPO trust region δ: mean per-token KL(old || new) an accepted step may reach.")
    cg_iters: int = _f(10, "TRPO conjugate-gradient iterations for the natural-gradient direction.")
    cg_damping: float = _f(
        0.1, "TRPO damping (F + λI) v for conjugate gradient; the step length uses the undamped curvature sᵀFs."
    )
    line_search_steps: int = _f(10, "TRPO backtracking line-search tries (step halves each time).")
    line_search_accept_ratio: float = _f(
        0.0, "TRPO accepts a step only if its surrogate gain exceeds this fraction of the expected gain (> 0 always)."
    )
    value_epochs: int = _f(4, "TRPO: epochs of the value head's own optimizer over each rollout.")
    value_learning_rate: float = _f(1e-3, "TRPO: learning rate of the value head's own Adam optimizer.")

    # --- separate value model (critic) ------------------------------------------------------------------------------
    value_model: str | None = _f(
        None,
        "A separate critic instead of the value head: a model id/path (1-output sequence classifier, or causal LM + "
        "fresh head) | reward_model (copy of the run's reward model) | policy (its weights; LoRA: a 2nd adapter).",
    )
    value_model_learning_rate: float | None = _f(
        None, "Learning rate of the value model's own AdamW (None = learning_rate); it follows lr_scheduler_type."
    )
    value_model_warmup_steps: int = _f(
        0, "The first N training steps update only the value model; the policy's weights stay exactly as they are."
    )

    # --- experience replay ----------------------------------------------------------------------------------------
    replay_buffer_size: int = _f(0, "Past sequences kept per process for replay (0 = replay off).")
    replay_batch_size: int = _f(0, "Replayed sequences added to each update (global; a multiple of mini_batch_size).")
    replay_is_clip: float = _f(1.0, "Truncate importance weights π/μ of replayed tokens at this value (ρ̄).")

    # --- KL penalty to the reference model --------------------------------------------------------------------
    kl_penalty: str = _f(
        "reward",
        "Where KL to the reference goes: reward (per-token penalty) | loss (a loss term, k1/k2/k3).",
        choices=("reward", "loss"),
    )
    kl_coef: float = _f(
        0.05, "Initial β of the per-token penalty -β·KL(policy || reference); 0 = no reference model at all."
    )
    kl_estimator: str = _f("k1", "Per-token KL estimator.", choices=("k1", "k2", "k3"))
    use_bias_correction_kl: bool = _f(
        True,
        "kl_penalty: loss: weight each token's KL term by its importance ratio π/π_old (with gradient), so that it "
        "differentiates KL(policy ‖ reference); false differentiates the estimate alone, whose gradient (for k3) is "
        "that of KL(reference ‖ policy). TRL GRPO's name and default.",
    )
    adaptive_kl: bool = _f(False, "Adapt β towards kl_target (Ziegler et al. 2019).")
    kl_target: float = _f(6.0, "Target sequence-level KL (nats) for the adaptive controller.")
    kl_horizon: int = _f(10000, "Horizon (in sequences) of the adaptive controller.")

    # --- scores and rewards ------------------------------------------------------------------------------------
    score_scaling: str = _f(
        "none",
        "Scale sequence scores: none | running_std (divide by a running std) | whiten (batch mean 0, std 1).",
        choices=("none", "running_std", "whiten"),
    )
    score_clip: float | None = _f(None, "Clip scaled scores to [-score_clip, score_clip] (None = off).")
    whiten_rewards: bool = _f(False, "Whiten the per-token rewards (mean kept) before GAE.")
    missing_eos_penalty: float | None = _f(
        None, "Subtract this from the score of a completion that hit max_new_tokens without a stop token."
    )

    # --- rewards declared in the config (instead of passing reward_fn) ---------------------------------------
    rewards: list = _f(
        [], "Rewards as [{name: bleu | module:function | file.py:function, weight: 1.0, kwargs: {...}, label: ...}]."
    )
    reward_weights: list[float] | None = _f(
        None, "Weights of a list of reward functions given in Python (reward_fn=[f1, f2]); None = 1 each."
    )
    reward_normalize: str = _f(
        "none",
        "Per-reward normalisation before weighting: none | batch (z-score) | running (running mean/std).",
        choices=("none", "batch", "running"),
    )
    reward_clip: float | None = _f(None, "Clip the combined reward to [-reward_clip, reward_clip] (None = off).")
    reward_nonfinite: float | None = _f(
        None, "None = NaN/inf from a reward is an error naming it; a number = replace it by this and count it."
    )

    # --- generation ---------------------------------------------------------------------------------------------
    max_new_tokens: int = _f(32, "Maximum completion length in tokens.")
    min_new_tokens: int = _f(0, "Minimum completion length before a stop token may be sampled.")
    temperature: float = _f(1.0, "Sampling temperature; also divides the logits of old, new and reference logprobs.")
    top_k: int = _f(0, "Sample from the k most likely tokens (0 = off).")
    top_p: float = _f(1.0, "Nucleus sampling mass (1.0 = off).")
    min_p: float | None = _f(None, "Drop tokens below min_p × the top token's probability (None = off).")
    stop_token_ids: list[int] | None = _f(
        None, "Token ids that end a completion (None = the tokenizer's EOS). Later tokens become padding."
    )
    chat_template_kwargs: dict = _f(
        {}, "Extra arguments for the tokenizer's chat template when prompts are message lists (e.g. enable_thinking)."
    )
    max_prompt_length: int | None = _f(
        None, "Keep only the last N prompt tokens (None = no truncation; too-long prompts are an error)."
    )
    generation_backend: str = _f(
        "hf",
        "Who samples completions: hf (transformers' generate on the policy) | vllm (a vLLM engine in this process, "
        "given the policy's weights after every update).",
        choices=("hf", "vllm"),
    )
    use_vllm: bool = _f(False, "TRL's switch: true = generation_backend vllm.")
    vllm_mode: str = _f(
        "colocate",
        "colocate: each training process owns an engine for its shard of prompts (the only mode; see README).",
    )
    vllm_gpu_memory_utilization: float = _f(
        0.3, "GPU: share of device memory the vLLM engine may take (weights + KV cache); the rest is training's."
    )
    vllm_kv_cache_gb: float | None = _f(
        None, "vLLM KV-cache size in GiB (None: on CPU, enough for one rollout batch; on GPU, from the share above)."
    )
    vllm_max_model_len: int | None = _f(
        None, "vLLM context length: prompt + completion tokens (None = max_prompt_length or 512, + max_new_tokens)."
    )
    vllm_enforce_eager: bool | None = _f(None, "vLLM without CUDA graphs (None = eager on CPU, graphs on GPU).")
    vllm_importance_sampling_correction: bool = _f(
        True,
        "Weight each token's loss by the truncated ratio π_train/π_vLLM of the sampled token, correcting the gap "
        "between the engine's and the trainer's numerics (TRL's switch of the same name).",
    )
    vllm_importance_sampling_mode: str = _f(
        "token_truncate",
        "token_truncate | token_mask | sequence_truncate | sequence_mask: per-token or per-sequence ratios, "
        "clipped into [clip_min, clip_max] (truncate) or zeroed outside it (mask).",
        choices=("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
    )
    vllm_importance_sampling_clip_max: float | None = _f(
        3.0, "Upper bound C_max of the vLLM importance ratio (None = none)."
    )
    vllm_importance_sampling_clip_min: float | None = _f(
        None, "Lower bound C_min of the vLLM importance ratio (None = none)."
    )

    # --- logging, evaluation, checkpoints ---------------------------------------------------------------------
    report_to: list[str] = _f(["tensorboard"], "Accelerate trackers to log to (tensorboard, wandb, ...; [] = none).")
    logging_steps: int = _f(1, "Log metrics every N steps.")
    eval_steps: int = _f(0, "Evaluate on eval_dataset every N steps (0 = only when evaluate() is called).")
    save_steps: int = _f(0, "Save a resumable checkpoint every N steps (0 = never).")
    save_total_limit: int | None = _f(None, "Keep at most this many checkpoints (oldest deleted first).")
    resume_from_checkpoint: bool | str | None = _f(
        None,
        "Continue a run: true = the newest checkpoint in output_dir, a path = that checkpoint (recipes and "
        "`hfpg train --resume`; PGTrainer.train() when it is given none).",
    )
    overwrite_output_dir: bool = _f(
        False,
        "Clear the previous run's checkpoints, metrics, samples, report and final model from output_dir before "
        "starting (without it, or resume_from_checkpoint, a used output_dir is an error).",
    )
    merge_adapter: bool = _f(
        False, "save_model / the final model: write the PEFT adapter merged into a full model instead of the adapter."
    )
    push_to_hub: bool = _f(False, "Recipes: push the final model (with its model card) to hub_model_id at the end.")
    hub_model_id: str | None = _f(None, "Hub repo id for push_to_hub, e.g. your-name/gpt2-ppo-imdb.")
    hub_private_repo: bool | None = _f(None, "Create the Hub repo as private (None = the Hub's default).")
    hub_revision: str | None = _f(None, "Branch to push to (created if needed; None = main).")
    disable_dropout: bool = _f(True, "Switch dropout off in policy, value head and reference (PPO needs ratio = 1).")
    disable_tqdm: bool = _f(False, "Hide the progress bar.")
    base_dir: str | None = field(
        default=None,
        compare=False,
        repr=False,
        metadata={
            "help": "The folder of the YAML file this config was read from: relative reward files and models are "
            "looked up there too. Set by from_yaml and recipes; never read from nor written to YAML.",
            "internal": True,
        },
    )

    # ----------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # transformers accepts "tensorboard", "none" and "all" as strings
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        problems = self._type_problems()
        if problems:  # the checks below compare numbers: a value of the wrong type would fail inside them
            raise ConfigError(format_problems(TITLE, problems), problems)
        problems = self.problems()
        if problems:
            raise ConfigError(format_problems(TITLE, problems), problems)

    # ---- validation --------------------------------------------------------------------------------------------
    def _type_problems(self) -> list[str]:
        """Each field's value checked against its annotation, as the YAML loader does (:func:`hfpg.schema.coerce`),
        so that ``PGConfig(learning_rate="abc")`` in Python names the key too; a value that fits is converted in
        place as the loader converts it (``3`` -> ``3.0`` for a float, ``"1e-5"`` -> ``1e-05``). NaN and infinity
        are refused for every float. Internal fields (``base_dir``) are the loader's and are not checked."""
        p = []
        for f in loadable_fields(type(self)):
            value, error = coerce(f.name, getattr(self, f.name), f.type)
            if error:
                p.append(error)
            else:
                setattr(self, f.name, value)
        return p

    def problems(self, num_processes: int = 1) -> list[str]:
        """Every inconsistency in this config (empty when it can run on ``num_processes`` processes)."""
        p: list[str] = []
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                p.append(f"{f.name}={value!r} is not one of {list(choices)}")
            if isinstance(value, float) and not math.isfinite(value):  # also a value set after construction
                p.append(f"{f.name}={value!r} must be a finite number (NaN and infinity are refused)")

        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v is None or (isinstance(v, float) and math.isnan(v)) or v < 0 or (v == 0 and not allow_zero):
                p.append(f"{name}={v!r} must be {'>= 0' if allow_zero else '> 0'}")

        for name in (
            "max_steps",
            "rollout_batch_size",
            "mini_batch_size",
            "gradient_accumulation_steps",
            "ppo_epochs",
            "max_new_tokens",
            "kl_horizon",
            "logging_steps",
            "temperature",
            "kl_target",
        ):
            positive(name)
        for name in (
            "learning_rate",
            "warmup_steps",
            "weight_decay",
            "clip_range",
            "clip_range_value",
            "vf_coef",
            "ent_coef",
            "kl_coef",
            "min_new_tokens",
            "top_k",
            "eval_steps",
            "save_steps",
            "max_nonfinite_steps",
        ):
            positive(name, allow_zero=True)
        if not self.adam_epsilon > 0:  # 0 divides 0 by 0 where a gradient is 0: NaN weights
            p.append(f"adam_epsilon={self.adam_epsilon!r} must be > 0")
        for name in ("gamma", "lam", "adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                p.append(f"{name}={v!r} must lie in [0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            p.append(f"top_p={self.top_p!r} must lie in (0, 1]")
        for name in (
            "forward_batch_size",
            "logits_chunk_size",
            "max_grad_norm",
            "target_approx_kl",
            "score_clip",
            "max_prompt_length",
            "save_total_limit",
        ):
            v = getattr(self, name)
            if v is not None and v <= 0:
                p.append(f"{name}={v!r} must be > 0 or null")
        if self.min_new_tokens > self.max_new_tokens:
            p.append(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}")
        if self.resume_from_checkpoint not in (None, False) and self.overwrite_output_dir:
            p.append("resume_from_checkpoint continues the run that overwrite_output_dir=true deletes: set one of them")
        if self.push_to_hub and not self.hub_model_id:
            p.append("push_to_hub=true needs hub_model_id (e.g. hub_model_id=your-name/my-model)")
        if not isinstance(self.report_to, list):
            p.append(f"report_to={self.report_to!r} must be a list, e.g. [tensorboard] or []")
        if self.stop_token_ids is not None and not all(isinstance(t, int) for t in self.stop_token_ids):
            p.append(f"stop_token_ids={self.stop_token_ids!r} must be a list of integer token ids")
        if self.min_p is not None and not 0.0 < self.min_p <= 1.0:
            p.append(f"min_p={self.min_p!r} must lie in (0, 1] or be null")
        for name in (
            "num_samples_per_prompt",
            "max_kl",
            "cg_iters",
            "line_search_steps",
            "value_epochs",
            "replay_is_clip",
        ):
            positive(name)
        for name in (
            "cg_damping",
            "value_learning_rate",
            "replay_buffer_size",
            "replay_batch_size",
            "line_search_accept_ratio",
            "dynamic_sampling_max_rounds",
        ):
            positive(name, allow_zero=True)
        if not 0.0 <= self.baseline_ema < 1.0:
            p.append(f"baseline_ema={self.baseline_ema!r} must lie in [0, 1)")
        p.extend(self.algorithm_problems())
        p.extend(self.loss_problems())
        p.extend(self.value_model_problems())
        if self.dynamic_sampling and self.num_samples_per_prompt < 2:
            p.append(
                "dynamic_sampling=true drops the prompt groups whose samples all scored the same, which needs groups: "
                f"set num_samples_per_prompt >= 2 (now {self.num_samples_per_prompt}), or dynamic_sampling: false"
            )
        if self.clip_range_high is not None and not self.clip_range_high > 0:
            p.append(f"clip_range_high={self.clip_range_high!r} must be > 0 or null (null = clip_range)")
        if self.adaptive_kl and self.kl_coef == 0:
            p.append(
                "adaptive_kl=true multiplies kl_coef, which stays 0: set kl_coef > 0 (e.g. 0.05) or adaptive_kl=false"
            )
        if self.reward_weights is not None:
            if not isinstance(self.reward_weights, list) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                for w in self.reward_weights
            ):
                p.append(f"reward_weights={self.reward_weights!r} must be a list of finite numbers, one per reward")
            elif self.rewards:
                p.append("reward_weights applies to reward functions passed in Python; in rewards: give each a weight")
        if not isinstance(self.chat_template_kwargs, dict):
            p.append(f"chat_template_kwargs={self.chat_template_kwargs!r} must be a mapping")
        if self.vllm_mode != "colocate":
            p.append(
                f"vllm_mode={self.vllm_mode!r} is not available: hfpg runs one vLLM engine inside each training "
                "process (vllm_mode: colocate); an engine on separate inference GPUs (TRL's server mode)"
                " is not supported yet"
            )
        if self.use_vllm and self.generation_backend == "hf":
            self.generation_backend = "vllm"  # TRL's spelling of the same choice
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            p.append(f"vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization!r} must lie in (0, 1]")
        for name in ("vllm_kv_cache_gb", "vllm_max_model_len"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                p.append(f"{name}={v!r} must be > 0 or null")
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if (lo is not None and lo < 0) or (hi is not None and hi <= 0) or (None not in (lo, hi) and lo >= hi):
            p.append(
                f"vllm_importance_sampling_clip_min={lo!r} / clip_max={hi!r} must satisfy 0 <= clip_min < clip_max "
                "(null = no bound)"
            )
        if self.reward_clip is not None and self.reward_clip <= 0:
            p.append(f"reward_clip={self.reward_clip!r} must be > 0 or null")
        p.extend(spec_problems(self.rewards))
        p.extend(self.batch_problems(num_processes))
        return p

    def algorithm_problems(self) -> list[str]:
        """Combinations of algorithm, advantage estimator and baseline that cannot work together."""
        p = []
        if self.advantage_estimator == "gae" and self.baseline not in ("none", "value"):
            p.append(
                f"baseline={self.baseline!r} applies to advantage_estimator=returns; GAE's baseline is the critic "
                f"(set advantage_estimator=returns, or baseline=none)"
            )
        if self.baseline in ("leave_one_out", "group_norm") and self.num_samples_per_prompt < 2:
            p.append(
                f"baseline={self.baseline} compares the k samples of a prompt: set num_samples_per_prompt >= 2 "
                f"(now {self.num_samples_per_prompt})"
            )
        rule = rule_class(self.algorithm)
        if rule is not None and self.replay_buffer_size and rule.replay_refusal:
            p.append(f"replay_buffer_size={self.replay_buffer_size}: {rule.replay_refusal}")
        if bool(self.replay_buffer_size) != bool(self.replay_batch_size):
            p.append(
                f"replay needs both replay_buffer_size and replay_batch_size > 0 (now {self.replay_buffer_size} "
                f"and {self.replay_batch_size})"
            )
        if self.replay_batch_size and self.replay_batch_size > self.replay_buffer_size:
            p.append(f"replay_batch_size={self.replay_batch_size} exceeds replay_buffer_size={self.replay_buffer_size}")
        return p

    def loss_problems(self) -> list[str]:
        """Loss normalisation, truncated-completion masking and the ratio level against the update rule."""
        p = []
        if self.loss_type == "bnpo":
            p.append(
                "loss_type=bnpo is TRL's per-process token mean; use loss_type: dapo, the same mean over the real "
                "tokens of the global minibatch (equal on one process without accumulation, and split-independent)"
            )
        if self.algorithm == "trpo":
            for name, default in (
                ("loss_type", "dapo"),
                ("mask_truncated_completions", False),
                ("importance_sampling_level", "token"),
            ):
                if getattr(self, name) != default:
                    p.append(
                        f"{name}={getattr(self, name)!r} applies to algorithm ppo or reinforce (the minibatch loss); "
                        f"TRPO's surrogate and trust region are token means over the batch: set {name}: {default}"
                    )
        elif self.importance_sampling_level == "sequence" and self.algorithm != "ppo":
            p.append(
                f"importance_sampling_level=sequence (GSPO) changes the clipped PPO ratio; algorithm "
                f"{self.algorithm} has no ratio to clip: set algorithm: ppo, or importance_sampling_level: token"
            )
        if not self.use_bias_correction_kl and self.kl_penalty != "loss":
            p.append(
                "use_bias_correction_kl=false changes the KL loss term, but kl_penalty is reward (the KL is in the "
                "rewards): set kl_penalty: loss, or remove use_bias_correction_kl"
            )
        return p

    def value_model_problems(self) -> list[str]:
        """``value_model`` and its keys: a critic only where the rule uses one, and what it cannot be combined with."""
        p = []
        if self.value_model is None:
            if self.value_model_learning_rate is not None or self.value_model_warmup_steps:
                p.append(
                    "value_model_learning_rate / value_model_warmup_steps apply to a separate critic: set value_model "
                    "(a model id or path, reward_model or policy), or remove them"
                )
            return p
        if not str(self.value_model).strip():
            p.append("value_model='' names no model: give a model id or path, reward_model or policy (or null)")
        if not (self.advantage_estimator == "gae" or self.baseline == "value"):
            p.append(
                f"value_model={self.value_model!r} trains a critic, but advantage_estimator={self.advantage_estimator} "
                f"with baseline={self.baseline} uses none; set advantage_estimator=gae or baseline=value, or "
                "value_model=null"
            )
        if self.value_model_learning_rate is not None and not self.value_model_learning_rate > 0:
            p.append(f"value_model_learning_rate={self.value_model_learning_rate!r} must be > 0 or null")
        if self.value_model_warmup_steps < 0:
            p.append(f"value_model_warmup_steps={self.value_model_warmup_steps} must be >= 0")
        elif self.value_model_warmup_steps >= self.max_steps:
            p.append(
                f"value_model_warmup_steps={self.value_model_warmup_steps} >= max_steps={self.max_steps}: the policy "
                "would never be trained; lower it"
            )
        if self.replay_buffer_size:
            p.append(
                "value_model with experience replay is not supported yet (replayed values come from the value head); "
                "set replay_buffer_size=0, or value_model=null"
            )
        if self.mixed_precision == "fp16":
            p.append(
                "value_model with mixed_precision=fp16 is not supported (one loss scaler for two optimizers); use bf16 "
                "or no"
            )
        return p

    def batch_problems(self, num_processes: int = 1) -> list[str]:
        """Batch sizes must divide: rollout = mini_batch × n_minibatches; mini_batch = processes × accum × micro."""
        p = []
        if self.rollout_batch_size <= 0 or self.mini_batch_size <= 0 or self.gradient_accumulation_steps <= 0:
            return p
        if self.rollout_batch_size % self.mini_batch_size:
            suggestion = _divisor_below(self.rollout_batch_size, self.mini_batch_size)
            p.append(
                f"rollout_batch_size={self.rollout_batch_size} is not a multiple of mini_batch_size="
                f"{self.mini_batch_size}; pick e.g. mini_batch_size={suggestion}"
            )
        per_update = num_processes * self.gradient_accumulation_steps
        if self.mini_batch_size % per_update:
            p.append(
                f"mini_batch_size={self.mini_batch_size} must be a multiple of num_processes ({num_processes}) × "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) = {per_update}"
            )
        k = self.num_samples_per_prompt
        if k > 0 and self.rollout_batch_size % (num_processes * k):
            p.append(
                f"rollout_batch_size={self.rollout_batch_size} must be a multiple of num_processes "
                f"({num_processes}) × num_samples_per_prompt ({k}) so each process holds whole groups"
            )
        if self.replay_batch_size and self.replay_batch_size % self.mini_batch_size:
            p.append(
                f"replay_batch_size={self.replay_batch_size} must be a multiple of mini_batch_size="
                f"{self.mini_batch_size}"
            )
        if self.replay_batch_size and k > 1 and self.replay_batch_size % (num_processes * k):
            p.append(
                f"replay_batch_size={self.replay_batch_size} must be a multiple of num_processes × "
                f"num_samples_per_prompt ({num_processes * k}): whole groups are replayed"
            )
        return p

    def check_for(self, num_processes: int) -> None:
        """Raise :class:`ConfigError` if the batch sizes do not divide over ``num_processes`` processes."""
        problems = self.batch_problems(num_processes)
        if problems:
            raise ConfigError(format_problems(TITLE, problems), problems)

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def whitens_advantages(self) -> bool:
        """``whiten_advantages`` as set, or its default. RLOO's leave-one-out advantages learned more per sample
        unwhitened (as TRL's RLOO, which does not whiten them); group-normalised (GRPO-style) advantages learned far
        more whitened on the toy task of the tests, where most groups score alike and whitening rescales the few
        that differ; PPO's critic advantages are whitened, as PPO implementations do."""
        if self.whiten_advantages is not None:
            return self.whiten_advantages
        return not (self.advantage_estimator == "returns" and self.baseline == "leave_one_out")

    @property
    def num_mini_batches(self) -> int:
        return self.rollout_batch_size // self.mini_batch_size

    # ---- loading and saving --------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        """The keys a YAML file or ``from_dict`` may set."""
        return [f.name for f in loadable_fields(cls)]

    @classmethod
    def from_dict(
        cls, data: dict[str, Any] | None, overrides: Iterable[str] = (), base_dir: str | None = None
    ) -> PGConfig:
        """Build from a mapping plus ``key=value`` strings (values parsed as YAML). Unknown keys get a did-you-mean."""
        data = apply_overrides(dict(data or {}), overrides)
        return build_or_raise(cls, data, TITLE, fallback="; see `hfpg config` for every key", base_dir=base_dir)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Iterable[str] = ()) -> PGConfig:
        """Read a YAML file of PGConfig keys; relative reward files are then also looked up next to it."""
        return cls.from_dict(read_yaml(path), overrides, base_dir=folder_of(path))

    def to_dict(self) -> dict[str, Any]:
        """Every key as plain data (``base_dir``, a local path, is left out)."""
        return to_dict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def documented_yaml(cls) -> str:
        """The defaults as YAML, each key preceded by its one-line doc."""
        lines = []
        for f in loadable_fields(cls):
            lines.append(f"# {f.metadata['help']}")
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            lines.append(yaml.safe_dump({f.name: default}, default_flow_style=True, width=1000).strip()[1:-1])
        return "\n".join(lines) + "\n"


TITLE = "invalid hfpg config"


def _divisor_below(n: int, m: int) -> int:
    for d in range(min(m, n), 0, -1):
        if n % d == 0:
            return d
    return 1
