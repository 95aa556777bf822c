"""TRL's config names and what each one is in hfpg: the hint an unknown key gets instead of a did-you-mean.

``TRL_KEY_HINTS`` maps a key of TRL's ``GRPOConfig`` / ``RLOOConfig`` (TRL 1.16), ``trl.experimental.ppo.PPOConfig``
(TRL 1.9) or ``transformers.TrainingArguments`` to a function of the value the user gave, returning the hfpg
setting with the arithmetic where the units differ. :func:`hfpg.schema.build` reads it as ``PGConfig.KEY_HINTS``, so
``PGConfig.from_dict({"num_generations": 4})`` (and a recipe with that key) reports::

    unknown key 'num_generations' (TRL's name): num_samples_per_prompt: 4 — completions sampled per prompt ...

A name PGConfig itself has (``learning_rate``, ``temperature``, ``kl_coef``, ``gradient_accumulation_steps``, ...) is
never looked up here: only unknown keys get hints. Facts checked against TRL 1.16 (GRPO, RLOO) and 1.9 (PPO).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["TRL_KEY_HINTS", "trl_hint"]


def _num(value: Any, symbol: str = "N") -> str:
    """The number the user gave, as written (``8``, ``0.28``), or ``symbol`` when the value is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return symbol
    return str(int(value)) if float(value).is_integer() else repr(value)


def _yaml(value: Any) -> str:
    """A value as YAML writes it (for ``key: value`` in a hint); ``true | false`` when there is none."""
    if value is None:
        return "true | false"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---- GRPOConfig / RLOOConfig (TRL 1.16) ------------------------------------------------------------------------------
def _num_generations(v: Any) -> str:
    return (
        f"num_samples_per_prompt: {_num(v, 'G')} — completions sampled per prompt, the same unit "
        "(rollout_batch_size must be a multiple of it; baseline: leave_one_out or group_norm compare them)"
    )


def _max_completion_length(v: Any) -> str:
    return f"max_new_tokens: {_num(v)} — the maximum completion length in tokens, the same unit"


def _beta(v: Any) -> str:
    b = _num(v, "β")
    return (
        f"kl_coef: {b}. TRL's GRPO adds β·k3 per token to the *loss* (its default β is 0: no KL term, no reference "
        "model); TRL's RLOO subtracts β × the summed k1 log-ratio from each completion's reward (default 0.05). "
        "hfpg's default (kl_penalty: reward, kl_estimator: k1, close to RLOO's) puts −β·KL into every token's reward; "
        f"to match GRPO set kl_coef: {b}, kl_penalty: loss, kl_estimator: k3"
    )


def _num_iterations(v: Any) -> str:
    return (
        f"ppo_epochs: {_num(v, 'μ')} — passes over each generated batch, the same unit; it needs algorithm: ppo "
        "(the clipped surrogate; algorithm: reinforce always makes one pass)"
    )


def _epsilon(v: Any) -> str:
    return f"clip_range: {_num(v, 'ε')} — the ratio is clipped to [1 − ε, 1 + ε], the same meaning"


def _epsilon_high(v: Any) -> str:
    return (
        f"clip_range_high: {_num(v, 'ε_high')} — the upper clip bound 1 + ε_high, the same meaning (null = clip_range)"
    )


def _scale_rewards(v: Any) -> str:
    given = {True: "group", False: "none"}[v] if isinstance(v, bool) else v  # TRL: true = group, false = none
    choices = {
        "group": "baseline: group_norm and whiten_advantages: false (reward minus the group mean, over the group std)",
        "batch": "baseline: leave_one_out and whiten_advantages: true, the closest (centred within the group, then "
        "scaled by a batch-wide std; hfpg whitens over real tokens)",
        "none": "baseline: leave_one_out and whiten_advantages: false (TRL's advantage, reward minus the group mean, "
        "times the constant k/(k−1))",
    }
    if given in choices:
        return f"for scale_rewards: {_yaml(v)} use advantage_estimator: returns with {choices[given]}"
    return "use advantage_estimator: returns with, for scale_rewards " + "; ".join(
        f"{k}: {c}" for k, c in choices.items()
    )


def _repetition_penalty(v: Any) -> str:
    return (
        "not a sampling setting in hfpg: every logits processor beyond temperature/top_k/top_p/min_p is kept off so "
        "that the trained distribution is the sampled one. Penalise repetition through the reward instead: "
        "rewards: [{name: repetition_penalty, weight: 0.5}] (−share of repeated n-grams, in [−1, 0])"
    )


def _vllm_is_cap(v: Any) -> str:
    return f"vllm_importance_sampling_clip_max: {_num(v)} — TRL's newer name for the same cap"


def _vllm_tensor_parallel_size(v: Any) -> str:
    return (
        "not available: each training process owns a vLLM engine (tensor-parallel size 1) for its own shard of "
        "prompts; remove vllm_tensor_parallel_size"
    )


def _vllm_server(v: Any) -> str:
    return (
        "vLLM server mode is not available in hfpg yet: generation_backend: vllm runs a colocated engine in each "
        "training process (vllm_mode: colocate); remove the vllm_server_* keys"
    )


def _ds3_gather(v: Any) -> str:
    return f"gather_for_generation: {_yaml(v)} — the same switch, for DeepSpeed ZeRO-3 and FSDP"


def _entropy_coef(v: Any) -> str:
    return f"ent_coef: {_num(v)} — weight of the entropy bonus, the same meaning"


def _normalize_advantages(v: Any) -> str:
    return (
        f"whiten_advantages: {_yaml(v)} — mean 0, std 1 over the batch (hfpg whitens over real tokens and defaults to "
        "true; TRL's RLOO defaults to false)"
    )


def _reward_clip_range(v: Any) -> str:
    numbers = isinstance(v, (list, tuple)) and v and all(_num(x) != "N" for x in v)
    bound = _num(max(abs(x) for x in v)) if numbers else "C"
    return (
        f"reward_clip: {bound} — hfpg clips the combined reward to the symmetric [−C, C] (or score_clip after "
        "score_scaling); an asymmetric (min, max) is not available"
    )


def _generation_batch_size(v: Any) -> str:
    return (
        f"rollout_batch_size: {_num(v)} — completions generated per step over all processes, the same unit; "
        "mini_batch_size sets how many of them make one optimizer step"
    )


def _steps_per_generation(v: Any) -> str:
    s = _num(v, "S")
    return (
        f"rollout_batch_size = per_device_train_batch_size × processes × {s} and mini_batch_size = "
        "per_device_train_batch_size × processes × gradient_accumulation_steps (TRL takes one optimizer step per "
        f"gradient_accumulation_steps micro-steps, so {s} / gradient_accumulation_steps minibatches per pass)"
    )


def _num_generations_eval(v: Any) -> str:
    return "not available: evaluate() samples one completion per eval prompt"


# ---- trl.experimental.ppo.PPOConfig (TRL 1.9) ------------------------------------------------------------------------
def _response_length(v: Any) -> str:
    return f"max_new_tokens: {_num(v)} — the maximum completion length in tokens, the same unit"


def _num_ppo_epochs(v: Any) -> str:
    return f"ppo_epochs: {_num(v)} — passes over each rollout batch, the same unit"


def _cliprange(v: Any) -> str:
    return f"clip_range: {_num(v, 'ε')} — the policy ratio clip, the same meaning"


def _cliprange_value(v: Any) -> str:
    return f"clip_range_value: {_num(v, 'ε_v')} — the value clip around the rollout's values, the same meaning"


def _num_mini_batches(v: Any) -> str:
    m = _num(v, "M")
    example = f"rollout_batch_size: {16 * int(m)}, mini_batch_size: 16" if m.isdigit() else "rollout_batch_size: 16·M"
    return (
        f"mini_batch_size = rollout_batch_size / {m} — hfpg sets the minibatch size itself, in sequences over all "
        f"processes (e.g. {example}). TRL's gradient_accumulation_steps spanned the whole batch, hfpg's spans one "
        f"minibatch: use TRL's gradient_accumulation_steps / {m}"
    )


def _total_episodes(v: Any) -> str:
    e = _num(v, "E")
    example = f"{-(-int(e) // 64)}" if e.isdigit() else "E / 64"
    return (
        f"max_steps = {e} / rollout_batch_size, rounded up (an episode is one completion; hfpg counts steps, each "
        f"rollout_batch_size completions; e.g. rollout_batch_size: 64 -> max_steps: {example})"
    )


def _local_rollout_forward_batch_size(v: Any) -> str:
    return (
        f"forward_batch_size: {_num(v)} — sequences per no-grad forward on each process during the rollout, the same "
        "unit (hfpg generates the whole local batch at once)"
    )


def _stop_token(v: Any) -> str:
    if v == "eos":
        return "remove it: hfpg stops every completion at the tokenizer's EOS by default (stop_token_ids: null)"
    return "stop_token_ids: [id, ...] — completions end at any of these (null, the default = the tokenizer's EOS)"


def _stop_token_id(v: Any) -> str:
    return (
        f"stop_token_ids: [{_num(v, 'id')}] — a list of token ids that end a completion (null, the default = the "
        "tokenizer's EOS)"
    )


def _num_sample_generations(v: Any) -> str:
    return (
        "recipes log samples with report: {samples_every: K} (every K steps; "
        f"K = max_steps / {_num(v)} matches {_num(v)} sample generations)"
    )


def _reward_model_path(v: Any) -> str:
    return (
        f"rewards: [{{name: reward_model, kwargs: {{model: {_yaml(v) if isinstance(v, str) else 'PATH'}}}}}] — any "
        "AutoModelForSequenceClassification, next to other rewards if you like"
    )


def _sft_model_path(v: Any) -> str:
    return "the policy is the model passed to PGTrainer, or model: {name_or_path: ...} in a recipe"


# ---- transformers.TrainingArguments ----------------------------------------------------------------------------------
def _precision(kind: str) -> Callable[[Any], str]:
    def hint(v: Any) -> str:
        if v is False:
            return "mixed_precision: no (the default: fp32)"
        return f"mixed_precision: {kind} (hfpg's default is no, i.e. fp32; TRL turns bf16 on unless fp16 is set)"

    return hint


def _per_device_train_batch_size(v: Any) -> str:
    n = _num(v)
    return (
        f"hfpg's batch sizes count sequences summed over all processes: rollout_batch_size = {n} × processes × "
        f"gradient_accumulation_steps (e.g. rollout_batch_size: {n} for 1 process without accumulation). GRPO/RLOO "
        "take one optimizer step per generated batch: mini_batch_size = rollout_batch_size; TRL's PPO: "
        "mini_batch_size = rollout_batch_size / num_mini_batches"
    )


def _per_device_eval_batch_size(v: Any) -> str:
    return (
        "no separate key: evaluate() samples one completion per eval prompt, rollout_batch_size prompts at a time "
        "over all processes (eval_steps sets how often)"
    )


def _num_train_epochs(v: Any) -> str:
    e = _num(v, "E")
    return (
        f"hfpg counts steps: max_steps = {e} × prompts in the dataset × num_samples_per_prompt / rollout_batch_size "
        "(each step samples rollout_batch_size / num_samples_per_prompt prompts)"
    )


def _warmup_ratio(v: Any) -> str:
    return (
        f"warmup_steps = {_num(v, 'r')} × the run's optimizer steps = max_steps × passes × rollout_batch_size / "
        "mini_batch_size (passes: ppo_epochs for PPO, 1 for REINFORCE)"
    )


def _eval_strategy(v: Any) -> str:
    return "eval_steps: N — evaluate on eval_dataset every N steps (0 = only when evaluate() is called)"


def _save_strategy(v: Any) -> str:
    return "save_steps: N — a resumable checkpoint every N steps (0 = never)"


TRL_KEY_HINTS: dict[str, Callable[[Any], str]] = {
    # GRPOConfig / RLOOConfig
    "num_generations": _num_generations,
    "num_generations_eval": _num_generations_eval,
    "max_completion_length": _max_completion_length,
    "beta": _beta,
    "num_iterations": _num_iterations,
    "epsilon": _epsilon,
    "epsilon_high": _epsilon_high,
    "scale_rewards": _scale_rewards,
    "repetition_penalty": _repetition_penalty,
    "ds3_gather_for_generation": _ds3_gather,
    "vllm_importance_sampling_cap": _vllm_is_cap,
    "vllm_tensor_parallel_size": _vllm_tensor_parallel_size,
    "vllm_server_host": _vllm_server,
    "vllm_server_port": _vllm_server,
    "vllm_server_base_url": _vllm_server,
    "vllm_server_timeout": _vllm_server,
    "entropy_coef": _entropy_coef,
    "normalize_advantages": _normalize_advantages,
    "reward_clip_range": _reward_clip_range,
    "generation_batch_size": _generation_batch_size,
    "steps_per_generation": _steps_per_generation,
    # trl.experimental.ppo.PPOConfig (1.9)
    "response_length": _response_length,
    "num_ppo_epochs": _num_ppo_epochs,
    "cliprange": _cliprange,
    "cliprange_value": _cliprange_value,
    "num_mini_batches": _num_mini_batches,
    "total_episodes": _total_episodes,
    "local_rollout_forward_batch_size": _local_rollout_forward_batch_size,
    "stop_token": _stop_token,
    "stop_token_id": _stop_token_id,
    "num_sample_generations": _num_sample_generations,
    "reward_model_path": _reward_model_path,
    "sft_model_path": _sft_model_path,
    # transformers.TrainingArguments
    "bf16": _precision("bf16"),
    "fp16": _precision("fp16"),
    "per_device_train_batch_size": _per_device_train_batch_size,
    "per_device_eval_batch_size": _per_device_eval_batch_size,
    "num_train_epochs": _num_train_epochs,
    "warmup_ratio": _warmup_ratio,
    "eval_strategy": _eval_strategy,
    "save_strategy": _save_strategy,
}


def trl_hint(key: str, value: Any = None) -> str | None:
    """The hint for TRL's ``key`` given ``value``, or None when ``key`` is not one of TRL's names."""
    hint = TRL_KEY_HINTS.get(key)
    return hint(value) if hint is not None else None
