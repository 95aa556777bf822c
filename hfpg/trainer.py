"""``PGTrainer``: one loop, on Accelerate — rollout -> reward -> advantages -> update -> log / evaluate / save."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TrainerControl, get_scheduler

from . import guards, ops, rundir
from .algorithms import build_algorithm
from .callbacks import CallbackHandler, TrainerCallback, sync_state, trainer_state
from .chat import is_conversational, render
from .config import PGConfig
from .data import Rows, as_dataset, check_prompt_format, check_prompts, is_stream, make_sampler
from .distributed import accelerator_kwargs, check_backend, check_launch, configure_deepspeed, full_weights
from .errors import ConfigError, DataError
from .forward import rollout_forward
from .kl import build_kl_controller
from .metrics import component_metrics, logged_metrics, step_metrics
from .modeling import (
    AutoModelForCausalLMWithValueHead,
    adalora_step_hook,
    create_reference_model,
    disable_dropout,
    reference_context,
    with_value_head,
)
from .normalize import ScoreShaper
from .replay import ReplayBuffer, mix_in_replay
from .rewards.base import setup_reward
from .rewards.calling import RewardInputs, RewardLog
from .rewards.combined import CombinedReward
from .rewards.models import RewardModelReward
from .rewards.registry import build_reward
from .rollout import (
    Rollout,
    build_generation_config,
    columns_for,
    completion_ids,
    concat_rollouts,
    decode_completions,
    generate_responses,
    tokenize_prompts,
)
from .saving import SavingMixin
from .sources import is_hub_id
from .stats import global_moments, global_sum
from .value_model import Critic, build_value_model, critic_values
from .vllm_backend import ColocatedVLLM, request_seeds, sampler_correction

logger = logging.getLogger(__name__)

# vLLM seed phases of dynamic sampling's extra rounds (the training rollout uses 0, evaluation chunks 1, 2, ...)
DYNAMIC_SAMPLING_SEED_PHASE = 1 << 20


class PGTrainer(SavingMixin):
    """Fine-tune a causal LM with policy-gradient RL against ``reward_fn(prompts, completions, **kwargs)``.

    model: an :class:`AutoModelForCausalLMWithValueHead`, a plain (or PEFT) causal LM, or a model id / path.
    config (or ``args``, TRL's name): a :class:`PGConfig` or a dict of its keys.
    reward_fn (or ``reward_funcs``, TRL's name): a reward callable, a list of them (weighted by ``reward_weights``,
    default 1 each), a :class:`~hfpg.rewards.CombinedReward`, or a reward model (an id or an
    ``AutoModelForSequenceClassification``); rewards are called with TRL's keyword contract
    (:mod:`hfpg.rewards.calling`). Default: the config's ``rewards:``.
    train_dataset: a ``datasets.Dataset`` / ``IterableDataset``, a list of dicts or a dict of lists, with a
    ``prompt_column`` of strings or of message lists (``[{"role": "user", "content": ...}]``, rendered with the
    tokenizer's chat template and ``chat_template_kwargs``).
    ref_model: frozen reference for the KL penalty (a model, or an id / path); by default a frozen copy of the
    policy, or — for a PEFT policy — the same weights with adapters disabled; none at all when ``kl_coef`` is 0.
    tokenizer (or ``processing_class``, TRL's name): the policy's tokenizer; EOS pads when it has no pad token.
    callbacks: hfpg :class:`~hfpg.callbacks.TrainerCallback` and ``transformers.TrainerCallback`` instances.
    peft_config: any ``peft`` adapter config (``LoraConfig``, ``IA3Config``, ...) to wrap a plain model in; only the
    adapter and the value head train, and the reference is the same base with the adapter disabled.
    """

    def __init__(
        self,
        model,
        tokenizer: PreTrainedTokenizerBase | None = None,
        config: PGConfig | dict | None = None,
        train_dataset=None,
        reward_fn: Callable | None = None,
        ref_model=None,
        eval_dataset=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        processing_class=None,
        peft_config=None,
        args: PGConfig | dict | None = None,
        reward_funcs=None,
        reward_weights: list[float] | None = None,
    ):
        config = _one_of("config", config, "args", args)  # args, reward_funcs, processing_class: TRL's names
        self.config = config = _as_config(config)
        reward_fn = _one_of("reward_fn", reward_fn, "reward_funcs", reward_funcs)
        self.reward_fn = _resolve_reward(reward_fn, config, reward_weights)  # a bad reward fails before models load
        self.algorithm = build_algorithm(config)
        self.accelerator = self._create_accelerator()
        tokenizer = _one_of("tokenizer", tokenizer, "processing_class", processing_class)
        if isinstance(model, str) and tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model)
        train_dataset, eval_dataset = self._check_formats(train_dataset, eval_dataset, tokenizer)  # before the model
        model = self._load_policy(model, tokenizer, peft_config)
        self._critic_module = self._build_critic(model)  # value_model: a separate critic (None: the value head)
        self.train_dataset, self.eval_dataset = self._check_datasets(train_dataset, eval_dataset, model)
        self.ref_model = self._prepare_models(model, ref_model)
        self.model, self.optimizer, self.scheduler = self._setup_optimization(model, *optimizers)
        self.critic = self._setup_critic()
        self._setup_run_state()
        self.generation_config = build_generation_config(config, self.tokenizer, self.stop_token_ids)
        self.vllm = self._create_vllm_engine()  # generation_backend: vllm (None for hf)
        # one TrainerState / TrainerControl, shared with transformers callbacks; global_step and log_history live there
        self.state = trainer_state(config, self.accelerator)
        self.control = TrainerControl()
        self.callback_handler = CallbackHandler(callbacks, self)
        self.callbacks = self.callback_handler.callbacks  # the live list: callbacks.append(cb) works
        # what the model card says beyond the config and the log: edit before save_model() / push_to_hub()
        base_name = getattr(model.base_model.config, "_name_or_path", None)
        self.model_card_data: dict = {
            "base_model": base_name if is_hub_id(base_name) else None,
            "datasets": None,
            "tags": [],
            "license": None,
            "language": None,
        }
        self.last_rollout: Rollout | None = None
        self.should_stop = False
        self._nonfinite_streak = 0  # updates in a row that skipped a non-finite optimizer step
        self._trackers_ready = False
        self._callback("on_init_end")

    # ---- construction, step by step ----------------------------------------------------------------------------------
    def _create_accelerator(self) -> Accelerator:
        """The Accelerator (trackers, mixed precision), checked against the launch, the batch sizes and the backend;
        every process is seeded with ``seed + process index`` so processes sample differently."""
        config = self.config
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=config.report_to or None,
            project_config=ProjectConfiguration(
                project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "runs")
            ),
            **accelerator_kwargs(),
        )
        check_launch(accelerator)
        config.check_for(accelerator.num_processes)
        check_backend(accelerator, self.algorithm)
        set_seed(config.seed, device_specific=True)
        return accelerator

    def _load_policy(self, model, tokenizer, peft_config) -> AutoModelForCausalLMWithValueHead:
        """The policy with a value head (loaded from an id / path, wrapped in ``peft_config``), and its tokenizer,
        padding and stop tokens (``self.tokenizer``, ``self.stop_token_ids``)."""
        if isinstance(model, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        model = with_value_head(model, peft_config)
        if tokenizer is None:
            raise TypeError("pass the tokenizer that matches the model (tokenizer=AutoTokenizer.from_pretrained(...))")
        if tokenizer.pad_token_id is None:  # GPT-2 & co: pad with EOS; masks never rely on pad != EOS
            logger.info("the tokenizer has no pad token; using its EOS token %r for padding", tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.stop_token_ids = list(self.config.stop_token_ids or [tokenizer.eos_token_id])
        if None in self.stop_token_ids:
            raise ConfigError("the tokenizer has no eos_token; set stop_token_ids=[...] in the config")
        return model

    def _build_critic(self, model):
        """The separate critic of ``value_model`` (:mod:`hfpg.value_model`), or None for the value head. Refuses what
        it cannot run: DeepSpeed / FSDP engines, and a LoRA critic on more than one process."""
        spec = self.config.value_model
        if spec is None:
            return None
        acc = self.accelerator
        if acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise ConfigError(
                "value_model runs on one process or DDP; a DeepSpeed / FSDP engine for the critic is not supported "
                "yet (use recipes/accelerate/ddp.yaml, or value_model=null for the value head)"
            )
        if spec == "policy" and model.is_peft_model and acc.num_processes > 1:
            raise ConfigError(
                "value_model: policy on a LoRA policy (a second adapter on the shared base) runs on one process only "
                "for now; on several processes give value_model a model id or path (a separate copy)"
            )
        critic = build_value_model(spec, model, self.tokenizer, self.reward_fn)
        if self.config.disable_dropout:
            disable_dropout(critic)
        return critic.to(acc.device)

    def _check_datasets(self, train_dataset, eval_dataset, model) -> tuple:
        """(train, eval), every prompt checked against the model's context (a stream: its first rows now, every later
        step's rows in step())."""
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self._context_length = getattr(text_config, "max_position_embeddings", None)
        for ds, name in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
            if ds is not None:
                self._check_prompts(self._stream_head if is_stream(ds) else ds, name)
        return train_dataset, eval_dataset

    def _check_prompts(self, dataset, name: str) -> None:
        cfg = self.config
        check_prompts(
            dataset,
            name,
            cfg.prompt_column,
            self.tokenizer,
            cfg.max_prompt_length,
            cfg.max_new_tokens,
            self._context_length,
            cfg.chat_template_kwargs,
        )

    def _check_formats(self, train_dataset, eval_dataset, tokenizer) -> tuple:
        """Before any model loads: the datasets' prompt column (strings or message lists, one kind, valid roles; a
        chat template for messages) and every reward's signature against the columns it will receive."""
        config = self.config
        train, evals = as_dataset(train_dataset, "train_dataset"), as_dataset(eval_dataset, "eval_dataset")
        if train is None:
            raise DataError(
                "train_dataset is required: a datasets.Dataset (or list of dicts) with a "
                f"{config.prompt_column!r} column"
            )
        for ds, name in ((train, "train_dataset"), (evals, "eval_dataset")):
            if ds is None:
                continue
            if is_stream(ds):  # its first step's rows stand for the stream; later rows are checked as they come
                self._stream_head = ds = Rows(
                    [dict(row) for row in ds.take(config.rollout_batch_size // config.num_samples_per_prompt)]
                )
            check_prompt_format(ds, name, config.prompt_column, tokenizer)
            columns = [c for c in ds.column_names if c != config.prompt_column]
            self.reward_fn.check_signatures(columns)
        return train, evals

    def _prepare_models(self, model, ref_model):
        """Freeze an unused value head, switch dropout off, build the frozen reference (None for a PEFT policy: the
        same weights with adapters off), turn on gradient checkpointing. Returns the reference.

        With ``kl_coef: 0`` there is no reference at all (``self.uses_reference`` False): none is loaded or run."""
        config = self.config
        self.uses_reference = config.kl_coef > 0  # adaptive_kl needs kl_coef > 0 (validated)
        # an untrained, unused value head (no critic, or a separate value_model): DDP would wait for its gradients
        if not self.algorithm.uses_critic or self._critic_module is not None:
            model.v_head.requires_grad_(False)
        if config.disable_dropout:
            disable_dropout(model)
        if not self.uses_reference:
            if ref_model is not None:
                logger.warning("kl_coef=0: the ref_model given is not used (no KL penalty, no reference forward)")
            if config.gradient_checkpointing:
                model.gradient_checkpointing_enable()
            return None
        if isinstance(ref_model, str):
            ref_model = AutoModelForCausalLM.from_pretrained(ref_model)
        if ref_model is None:
            ref_model = create_reference_model(model)
        if ref_model is not None:
            if config.disable_dropout:
                disable_dropout(ref_model)
            ref_model.eval().requires_grad_(False)
            ref_model.to(self.accelerator.device)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return ref_model

    def _setup_optimization(self, model, optimizer=None, scheduler=None):
        """(prepared model, prepared optimizer, scheduler): AdamW over the trainable weights and a transformers
        schedule over every optimizer step of the run, unless given; AdaLoRA's rank allocation hooked in."""
        config = self.config
        # value_model_warmup_steps: the policy takes no optimizer (or scheduler) step in the first N steps
        policy_steps = config.max_steps - (config.value_model_warmup_steps if config.value_model else 0)
        self.num_optimizer_steps = policy_steps * self.algorithm.optimizer_steps_per_update
        if model.peft_type == "ADALORA":  # re-allocates ranks from the gradients after every optimizer step
            self.algorithm.add_optimizer_step_hook(
                adalora_step_hook(model, lambda: self.scheduler.last_epoch, self.num_optimizer_steps)
            )
        shared = getattr(self._critic_module, "shared_parameter_ids", frozenset())  # a LoRA critic's adapter
        if optimizer is None:
            optimizer = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad and id(p) not in shared],
                lr=config.learning_rate,
                betas=(config.adam_beta1, config.adam_beta2),
                eps=config.adam_epsilon,
                weight_decay=config.weight_decay,
            )
        if scheduler is None:
            scheduler = get_scheduler(
                config.lr_scheduler_type,
                optimizer,
                num_warmup_steps=config.warmup_steps,
                num_training_steps=self.num_optimizer_steps,
            )
        configure_deepspeed(self.accelerator, config)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        return model, optimizer, scheduler  # the scheduler is not prepared: Accelerate would step it per process

    def _setup_critic(self) -> Critic | None:
        """The separate critic prepared with Accelerate like the policy (DDP), with its own AdamW (lr
        ``value_model_learning_rate`` or ``learning_rate``) and a ``lr_scheduler_type`` schedule over its steps."""
        config, critic = self.config, self._critic_module
        if critic is None:
            return None
        optimizer = torch.optim.AdamW(
            [p for p in critic.parameters() if p.requires_grad],
            lr=config.value_model_learning_rate or config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
        scheduler = get_scheduler(
            config.lr_scheduler_type,
            optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps * self.algorithm.critic_steps_per_update,
        )
        shared = critic.shared_parameter_ids
        model, optimizer = self.accelerator.prepare(critic, optimizer)
        self.algorithm.critic = Critic(model, optimizer, scheduler, shared)
        return self.algorithm.critic

    def _setup_run_state(self) -> None:
        """What a checkpoint holds beside the weights: scheduler, KL controller, score shaper, prompt sampler, update
        rule, replay buffer, a stateful reward (``SavingMixin._checkpoint_objects``). The reward is set up on this
        process's device, with running statistics over all processes."""
        config, acc = self.config, self.accelerator
        self.kl_ctl = build_kl_controller(config)
        self.score_shaper = ScoreShaper(config)
        prompts_per_step = config.rollout_batch_size // config.num_samples_per_prompt
        self.sampler = make_sampler(
            self.train_dataset, prompts_per_step, config.seed, acc.process_index, acc.num_processes
        )
        self.replay = (
            ReplayBuffer(config.replay_buffer_size, config.num_samples_per_prompt)
            if config.replay_buffer_size
            else None
        )
        # not registered with Accelerate (its custom state is a pickle of the main process's objects only): each
        # process saves its own as JSON + safetensors (saving.py)
        setup_reward(self.reward_fn, device=acc.device, gather=self._gather_cpu)  # models never go into DDP

    def _create_vllm_engine(self) -> ColocatedVLLM | None:
        """The colocated vLLM engine (``generation_backend: vllm``), created once; it gets the policy's weights before
        the first rollout and after every update (:meth:`sync_generation_weights`)."""
        self._vllm_stale = True
        if self.config.generation_backend != "vllm":
            return None
        local_batch = self.config.rollout_batch_size // self.accelerator.num_processes
        return ColocatedVLLM(self.unwrapped_model, self.tokenizer, self.config, self.accelerator, local_batch)

    def sync_generation_weights(self, policy=None) -> float:
        """Push the policy's current weights into the vLLM engine now (the trainer does it before every rollout that
        follows an update or a checkpoint load; call it after changing the weights by hand). Returns seconds."""
        if self.vllm is None:
            return 0.0
        if policy is None:
            with full_weights(self.model, self.accelerator, self.config.gather_for_generation) as gathered:
                seconds = self.vllm.sync_weights(gathered)
        else:
            seconds = self.vllm.sync_weights(policy)
        self._vllm_stale = False
        return seconds

    # ---- public API ------------------------------------------------------------------------------------------------
    @property
    def unwrapped_model(self) -> AutoModelForCausalLMWithValueHead:
        return self.accelerator.unwrap_model(self.model)

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict[str, float]:
        """Run until ``max_steps``; returns the last step's metrics. ``resume_from_checkpoint``: a checkpoint folder,
        or True for the newest one in ``output_dir``.

        After each step's ``on_step_end`` the loop honours ``self.control`` as transformers' Trainer does:
        ``should_training_stop`` ends the run (as ``self.should_stop = True`` does), ``should_log`` /
        ``should_evaluate`` / ``should_save`` log, evaluate (with an eval_dataset) or save this step, unless the
        ``logging_steps`` / ``eval_steps`` / ``save_steps`` schedule already did."""
        cfg = self.config
        # one run per output_dir: fresh, resumed (default: config.resume_from_checkpoint) or overwrite_output_dir
        resume_from_checkpoint = rundir.start_training(self, resume_from_checkpoint)
        if resume_from_checkpoint:
            self.load_checkpoint(resume_from_checkpoint)
            self._vllm_stale = True
        sync_state(self.state, cfg)
        self._init_trackers()
        self._callback("on_train_begin")
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.global_step,
            desc=f"hfpg {cfg.algorithm}",
            dynamic_ncols=True,
            disable=cfg.disable_tqdm or not self.accelerator.is_local_main_process,
        )
        metrics: dict[str, float] = {}
        while self.global_step < cfg.max_steps and not self.should_stop and not self.control.should_training_stop:
            self._callback("on_step_begin")
            # value_model_warmup_steps: the first N steps train only the critic
            self.algorithm.policy_frozen = self.critic is not None and self.global_step < cfg.value_model_warmup_steps
            metrics = self.step()
            self.global_step += 1
            bar.update(1)
            parts = {
                k.split("/")[1]: f"{v:.3g}"
                for k, v in metrics.items()
                if k.startswith("reward/") and k.endswith("/mean")
            }
            bar.set_postfix(
                score=f"{metrics['objective/scores']:.3f}",
                **dict(list(parts.items())[:4]),
                kl=f"{metrics.get('objective/kl', 0.0):.3f}",
                beta=f"{metrics['objective/kl_coef']:.3g}",
            )
            logged = self.global_step % cfg.logging_steps == 0 or self.global_step == cfg.max_steps
            evaluated = bool(
                cfg.eval_steps and self.eval_dataset is not None and self.global_step % cfg.eval_steps == 0
            )
            saved = bool(cfg.save_steps and self.global_step % cfg.save_steps == 0)
            if logged:
                self.log(metrics)
            if evaluated:
                self.evaluate()
            if saved:
                self.save_checkpoint()
            self._callback("on_step_end", metrics=metrics)
            # what the callbacks asked for in on_step_end (transformers' _maybe_log_save_evaluate), once per step
            if self.control.should_log and not logged:
                self.log(metrics)
            if self.control.should_evaluate and not evaluated and self.eval_dataset is not None:
                self.evaluate()
            if self.control.should_save and not saved:
                self.save_checkpoint()
        bar.close()
        self._callback("on_train_end")
        self.end_training()
        self.accelerator.wait_for_everyone()
        return metrics

    def step(self) -> dict[str, float]:
        """One iteration: rollout of a global batch (k samples per prompt), scores, optional replay, advantages,
        update, KL controller."""
        cfg = self.config
        t_step = self._clock()
        fused = self.algorithm.fuses_policy_forward
        if cfg.dynamic_sampling:
            rollout, timings, sampling_metrics = self._dynamic_sampling_rollout(policy_forward=not fused)
        else:
            rollout, timings = self.make_rollout(self._next_rows(), policy_forward=not fused)
            sampling_metrics = {}
        first_forward = None
        if fused:  # the update's own forward gives the "old" logprobs: the policy has not moved yet
            t0 = self._clock()
            first_forward = self.algorithm.training_forward(self.model, rollout)
            timings["time/policy_forward"] = self._clock() - t0
            timings["time/rollout"] += timings["time/policy_forward"]
        scores = self.score_shaper(rollout.scores, rollout.has_stop, self.accelerator, rollout.scorable)
        t0 = self._clock()
        batch, batch_scores, replay_metrics = self._add_replay(rollout, scores)
        kl_coef = self.kl_ctl.value
        adv = self.algorithm.compute_advantages(batch, batch_scores, kl_coef, self.accelerator)
        update_metrics = self.algorithm.update(
            self.model,
            self.optimizer,
            self.scheduler,
            self.accelerator,
            batch,
            adv["advantages"],
            adv["returns"],
            kl_coef,
            first_forward,
        )
        timings["time/update"] = self._clock() - t0
        self._vllm_stale = True  # the engine samples with the old weights until the next rollout syncs
        B, T = rollout.response_ids.shape  # the fresh rows come first in the batch
        fresh_adv = {k: v[:B, :T] for k, v in adv.items()}
        metrics = step_metrics(self.accelerator, rollout, fresh_adv, scores, kl_coef, with_kl=self.uses_reference)
        self.last_rollout = rollout  # for callbacks (samples.jsonl)
        if self.uses_reference:
            self.kl_ctl.update(metrics["objective/kl"], n_samples=cfg.rollout_batch_size)
        if self.replay is not None:
            self.replay.add(rollout, scores, self.global_step)
        metrics.update(replay_metrics)
        metrics.update(sampling_metrics)
        metrics.update(component_metrics(self.accelerator, self.reward_fn, rollout.components))
        metrics.update(logged_metrics(self.accelerator, rollout.reward_metrics))
        metrics.update(update_metrics)
        # consecutive updates with skipped non-finite steps (this trainer's, not checkpointed): stops the run before
        # train() logs or saves this step once max_nonfinite_steps is reached
        self._nonfinite_streak = guards.nonfinite_streak(self._nonfinite_streak, metrics, cfg)
        metrics.update(timings)
        metrics["time/step"] = step_time = self._clock() - t_step
        tokens = global_sum(
            self.accelerator, torch.stack([rollout.prompt_mask.sum(), rollout.response_mask.sum()]).float()
        ).tolist()
        metrics["tokens_per_second"] = (tokens[0] + tokens[1]) / step_time
        metrics["time/generated_tokens_per_second"] = tokens[1] / max(timings["time/generate"], 1e-9)
        return metrics

    def _next_rows(self) -> list[dict]:
        """This process's prompts of the next batch, each repeated k times (groups are contiguous)."""
        rows = self.sampler.next_rows()
        if is_stream(self.train_dataset):  # streamed rows were not all checked up front
            self._check_prompts(Rows(rows), f"train_dataset (streamed rows of step {self.global_step + 1})")
        return [row for row in rows for _ in range(self.config.num_samples_per_prompt)]

    def _dynamic_sampling_rollout(self, policy_forward: bool) -> tuple[Rollout, dict[str, float], dict[str, float]]:
        """DAPO's dynamic sampling: a prompt group whose k samples all got the same score has advantage 0 under a
        group baseline and teaches nothing. Such groups are dropped and further batches of prompts sampled (each
        round one batch, drawn from the same prompt sampler, so a resumed run draws the same prompts) until every
        process holds a full batch of groups that differ, or ``dynamic_sampling_max_rounds`` extra rounds are spent;
        then the dropped groups fill what is missing (``dynamic_sampling/filled_groups``). Every process takes the
        same number of rounds (generation and rewards may be collective). The batch keeps its size and order: kept
        groups in the order they were sampled, then the fillers."""
        cfg, acc = self.config, self.accelerator
        k = cfg.num_samples_per_prompt
        want = cfg.rollout_batch_size // acc.num_processes // k  # groups this process needs
        kept: list[Rollout] = []
        dropped: list[Rollout] = []
        n_kept = n_dropped = n_generated = 0
        timings: dict[str, float] = {}
        reward_logs: list[dict[str, list[float]]] = []
        rounds = 0
        while True:
            # round 0 samples as a step without dynamic sampling does; the extra rounds get their own vLLM seeds
            phase = 0 if rounds == 0 else DYNAMIC_SAMPLING_SEED_PHASE + rounds
            rollout, round_timings = self.make_rollout(self._next_rows(), policy_forward, seed_phase=phase)
            reward_logs.append(rollout.reward_metrics)  # logged values, not per row: kept apart from select()
            rollout.reward_metrics = {}
            for name, value in round_timings.items():
                timings[name] = timings.get(name, 0.0) + value
            rounds += 1
            varied = ops.groups_with_spread(rollout.scores, k, rollout.scorable)
            rows = torch.arange(rollout.batch_size).view(-1, k)
            varied = varied.cpu()  # every group that differs is kept (the batch is cut to size below)
            keep_rows = rows[varied].flatten().tolist()
            drop_rows = rows[~varied].flatten().tolist()
            if keep_rows:
                kept.append(rollout.select(keep_rows))
            if drop_rows:
                dropped.append(rollout.select(drop_rows))
            n_kept += len(keep_rows) // k
            n_dropped += len(drop_rows) // k
            n_generated += rollout.batch_size
            short = torch.tensor(float(n_kept < want), device=acc.device)
            if global_sum(acc, short).item() == 0 or rounds > cfg.dynamic_sampling_max_rounds:
                break
        filled = max(want - n_kept, 0)
        parts = kept + dropped  # fillers after every kept group, in the order they were sampled
        batch = concat_rollouts(parts, self.tokenizer.pad_token_id).select(range(want * k))
        batch.components = {
            name: torch.cat([part.components[name] for part in parts])[: want * k] for name in parts[0].components
        }
        batch.extras = {
            name: [v for part in parts for v in part.extras.get(name, [])][: want * k] for name in parts[0].extras
        }
        # values the rewards logged (log_metric): of every sample scored this step, not per row
        batch.reward_metrics = {}
        for logged in reward_logs:
            for name, values in logged.items():
                batch.reward_metrics.setdefault(name, []).extend(values)
        counts = global_sum(acc, torch.tensor([n_dropped, n_dropped + n_kept, filled, n_generated], device=acc.device))
        dropped_groups, all_groups, filled_groups, generated = counts.double().tolist()
        metrics = {
            "dynamic_sampling/rounds": float(rounds),
            "dynamic_sampling/dropped_fraction": dropped_groups / max(all_groups, 1.0),
            "dynamic_sampling/filled_groups": filled_groups,
            "dynamic_sampling/generated_samples": generated,
        }
        return batch, timings, metrics

    def _add_replay(self, rollout: Rollout, scores: torch.Tensor) -> tuple[Rollout, torch.Tensor, dict]:
        """Fresh rollout (+ replayed sequences with recomputed current logprobs/values and truncated IS weights)."""
        rollout.behaviour_logprobs = rollout.logprobs
        rollout.is_weights = rollout.response_mask.float()
        rollout.staleness = torch.zeros(rollout.batch_size, device=self.accelerator.device)
        sampler_metrics = {}
        if rollout.sampler_logprobs is not None:  # vLLM sampled: measure (and correct) its gap to our forward
            weights, sampler_metrics = sampler_correction(rollout, self.config, self.accelerator)
            if self.config.vllm_importance_sampling_correction:
                rollout.is_weights = weights
        if self.replay is None:
            return rollout, scores, sampler_metrics
        with full_weights(self.model, self.accelerator, self.config.gather_for_generation) as policy:
            batch, batch_scores, metrics = mix_in_replay(
                self.replay,
                rollout,
                scores,
                policy,
                self.config,
                self.accelerator,
                self.tokenizer.pad_token_id,
                self.global_step,
            )
        return batch, batch_scores, {**sampler_metrics, **metrics}

    @torch.no_grad()
    def make_rollout(
        self, rows: list[dict], policy_forward: bool = True, seed_phase: int = 0
    ) -> tuple[Rollout, dict[str, float]]:
        """Generate for ``rows`` and attach logprobs, values, reference logprobs and scores. (B = len(rows)).

        Every process calls it together (a sharded policy is gathered once for the whole rollout).
        policy_forward=False leaves logprobs/values/entropy to the caller (the update rule's fused forward).
        ``seed_phase`` tells the vLLM backend's per-completion seeds apart (0: training rollout; evaluation uses 1+)."""
        with full_weights(self.model, self.accelerator, self.config.gather_for_generation) as policy:
            return self._rollout(policy, rows, policy_forward, seed_phase)

    def _generate(self, policy, prompt_ids, prompt_mask, seed_phase: int, timings: dict) -> tuple:
        """(response_ids, response_mask, has_stop, sampler logprobs or None) from the configured backend."""
        if self.vllm is None:
            with self.accelerator.autocast():
                return (
                    *generate_responses(
                        policy,
                        prompt_ids,
                        prompt_mask,
                        self.generation_config,
                        self.stop_token_ids,
                        self.tokenizer.pad_token_id,
                    ),
                    None,
                )
        if self._vllm_stale:
            timings["time/weight_sync"] = self.sync_generation_weights(policy)
        acc = self.accelerator
        seeds = request_seeds(self.config.seed, acc.process_index, self.global_step, len(prompt_ids), seed_phase)
        out = self.vllm.generate(prompt_ids, prompt_mask, self.stop_token_ids, self.tokenizer.pad_token_id, seeds)
        return out.response_ids, out.response_mask, out.has_stop, out.logprobs

    def _rollout(
        self, policy, rows: list[dict], policy_forward: bool, seed_phase: int = 0
    ) -> tuple[Rollout, dict[str, float]]:
        cfg, acc = self.config, self.accelerator
        prompts = [r[cfg.prompt_column] for r in rows]  # strings, or message lists (conversational)
        conversational = bool(prompts) and is_conversational(prompts[0])
        text = render(self.tokenizer, prompts, cfg.chat_template_kwargs) if conversational else prompts
        policy.eval()  # no dropout and no gradient checkpointing during generation
        timings = {}
        clock = self._clock
        t = clock()
        prompt_ids, prompt_mask = tokenize_prompts(
            self.tokenizer, text, cfg.max_prompt_length, acc.device, add_special_tokens=not conversational
        )
        response_ids, response_mask, has_stop, sampler_logprobs = self._generate(
            policy, prompt_ids, prompt_mask, seed_phase, timings
        )
        timings["time/generate"] = clock() - t - timings.get("time/weight_sync", 0.0)
        rollout = Rollout(
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            has_stop,
            sampler_logprobs=sampler_logprobs,
            prompts=text,
            columns=columns_for(rows, cfg.prompt_column),
        )
        t = clock()
        if policy_forward:
            with acc.autocast():
                out = rollout_forward(
                    policy,
                    rollout,
                    cfg.temperature,
                    with_values=self.critic is None,
                    with_entropy=True,
                    chunk_size=cfg.forward_batch_size,
                    logits_chunk_size=cfg.logits_chunk_size,
                )
                if self.critic is not None:  # values from the separate critic
                    self.critic.model.eval()
                    out["values"] = critic_values(self.critic.model, rollout, chunk_size=cfg.forward_batch_size)
            rollout.logprobs, rollout.values, rollout.entropy = out["logprobs"], out["values"], out["entropy"]
        timings["time/policy_forward"] = clock() - t
        t = clock()
        if self.uses_reference:
            with acc.autocast(), reference_context(policy, self.ref_model) as ref:
                rollout.ref_logprobs = rollout_forward(
                    ref,
                    rollout,
                    cfg.temperature,
                    with_values=False,
                    chunk_size=cfg.forward_batch_size,
                    logits_chunk_size=cfg.logits_chunk_size,
                )["logprobs"]
        timings["time/ref_forward"] = clock() - t
        t = clock()
        rollout.completions = decode_completions(self.tokenizer, response_ids, response_mask)
        self._score(rollout, prompts, conversational)
        timings["time/reward"] = clock() - t
        timings["time/rollout"] = sum(timings.values())  # weight sync included
        return rollout, timings

    def _score(self, rollout: Rollout, prompts: list, conversational: bool) -> None:
        """Score the rollout's completions: TRL's keyword contract (prompts as given, completion ids as sampled, the
        trainer state, log_metric / log_extra, the other columns). Fills scores, scorable, components and the logs."""
        log = RewardLog()
        result = self.reward_fn.score(
            RewardInputs(
                prompts=prompts,
                completions=rollout.completions,
                completion_ids=completion_ids(rollout.response_ids, rollout.response_mask),
                columns=rollout.columns,
                rendered_prompts=rollout.prompts,
                conversational=conversational,
                trainer_state=self.state,
                log=log,
            )
        )
        device = self.accelerator.device
        rollout.scores, rollout.scorable = result.total.to(device), result.scorable.to(device)
        rollout.components = result.components
        rollout.reward_metrics, rollout.extras = dict(log.metrics), dict(log.extras)
        if not result.scorable.all():
            unscorable = (~result.scorable).nonzero().flatten().tolist()
            logger.warning(
                "no reward applied to %d of %d samples (every reward returned None), e.g. the completion %r of the "
                "prompt %r; they get no gradient this step (objective/unscorable_fraction)",
                len(unscorable),
                rollout.batch_size,
                rollout.completions[unscorable[0]][:80],
                str(rollout.prompts[unscorable[0]])[:80],
            )

    @torch.no_grad()
    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """Sample completions for the eval prompts (sharded over processes) and report mean score, KL and length."""
        acc, cfg = self.accelerator, self.config
        ds = self.eval_dataset
        if eval_dataset is not None:
            ds = as_dataset(eval_dataset, "eval_dataset")
            self._check_prompts(ds, "eval_dataset")
        if ds is None:
            raise DataError("evaluate() needs an eval_dataset (pass it here or to the trainer)")
        local = list(range(acc.process_index, len(ds), acc.num_processes))
        chunk = cfg.rollout_batch_size // acc.num_processes
        parts: dict[str, list[torch.Tensor]] = {"scores": [], "scorable": [], "kl": [], "length": []}
        components: dict[str, list[torch.Tensor]] = {}
        logged: dict[str, list[float]] = {}
        for start in range(0, len(local), chunk):
            part = ds[local[start : start + chunk]]
            rows = [dict(zip(part, vals)) for vals in zip(*part.values())]
            r, _ = self.make_rollout(rows, seed_phase=1 + start // chunk)
            if r.ref_logprobs is not None:
                kl = ops.kl_per_token(r.logprobs, r.ref_logprobs, cfg.kl_estimator)
                parts["kl"].append(ops.masked_sum(kl, r.response_mask, 1))
            parts["scores"].append(r.scores)
            parts["scorable"].append(r.scorable)
            parts["length"].append(r.response_mask.sum(1).float())
            for name, scores in r.components.items():
                components.setdefault(name, []).append(scores)
            for name, values in r.reward_metrics.items():
                logged.setdefault(name, []).extend(values)
        cat = {k: torch.cat(v) if v else torch.zeros(0, device=acc.device) for k, v in parts.items()}
        scorable = cat.pop("scorable").bool()
        cat["unscorable"] = (~scorable).float()
        cat["scores"] = (cat["scores"], scorable)
        m = global_moments(acc, cat)
        metrics = {
            "eval/scores": m["scores"].mean,
            "eval/scores_std": m["scores"].std,
            "eval/kl": m["kl"].mean,
            "eval/completion_length": m["length"].mean,
            "eval/num_samples": m["length"].count,
            "eval/unscorable_fraction": m["unscorable"].mean,
        }
        if not self.uses_reference:
            del metrics["eval/kl"]
        metrics.update(
            component_metrics(acc, self.reward_fn, {k: torch.cat(v) for k, v in components.items()}, "eval/reward")
        )
        metrics.update(logged_metrics(acc, logged, "eval/reward"))
        self.log(metrics)
        self._callback("on_evaluate", metrics=metrics)
        return metrics

    def log(self, metrics: dict[str, float]) -> None:
        """Send metrics to the trackers in ``report_to`` and append them to ``output_dir/metrics.jsonl``."""
        self._init_trackers()
        record = {"step": self.global_step, **{k: float(v) for k, v in metrics.items()}}
        self.log_history.append(record)
        if self.config.report_to:
            self.accelerator.log(metrics, step=self.global_step)
        if self.accelerator.is_main_process:
            rundir.before_first_write(self)  # what output_dir held before this trainer wrote there
            os.makedirs(self.config.output_dir, exist_ok=True)
            with open(os.path.join(self.config.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        self._callback("on_log", logs=metrics)

    # ---- internals -----------------------------------------------------------------------------------------------
    def _gather_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate a CPU tensor over all processes (on the device the backend needs), back on the CPU."""
        if self.accelerator.num_processes == 1:
            return x
        return self.accelerator.gather(x.to(self.accelerator.device)).cpu()

    def _clock(self) -> float:
        """Wall time after the device's queued work is done, so each phase is charged its own GPU time."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # a CPU-GPU sync point, once per phase
        return time.perf_counter()

    def _init_trackers(self) -> None:
        if self._trackers_ready or not self.config.report_to:
            return
        hparams = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.config.to_dict().items()
        }
        self.accelerator.init_trackers("hfpg", config=hparams)
        self._trackers_ready = True

    def _callback(self, event: str, **kwargs) -> TrainerControl:
        """Fire ``event`` (transformers' name) on every callback; returns the (possibly replaced) ``self.control``."""
        return self.callback_handler.fire(event, **kwargs)

    @property
    def global_step(self) -> int:
        """Steps done; ``self.state.global_step``."""
        return self.state.global_step

    @global_step.setter
    def global_step(self, value: int) -> None:
        self.state.global_step = value

    @property
    def log_history(self) -> list[dict]:
        """Every logged record (``{"step": N, **metrics}``); ``self.state.log_history``."""
        return self.state.log_history

    @log_history.setter
    def log_history(self, value: list[dict]) -> None:
        self.state.log_history = value

    def end_training(self) -> None:
        """Flush and close the trackers (TensorBoard writes its last events). Unlike ``Accelerator.end_training`` it
        keeps the process group alive, so ``evaluate()`` and ``save_model()`` still work after ``train()``."""
        if self._trackers_ready:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
            self._trackers_ready = False


def _resolve_reward(reward_fn, config: PGConfig, reward_weights=None) -> CombinedReward:
    """The reward to train against, as one :class:`CombinedReward`: ``reward_fn`` (a callable, a list of them with
    ``reward_weights``, a reward-model id or model), or the ``rewards:`` the config declares (built, not loaded)."""
    if reward_fn is not None and config.rewards and getattr(reward_fn, "specs", None) != config.rewards:
        raise ConfigError(
            "both reward_fn and config.rewards are set; pass one (rewards: in YAML builds a "
            "CombinedReward, reward_fn= takes any callable, a list of them, or a CombinedReward)"
        )
    if (
        reward_weights is not None
        and config.reward_weights is not None
        and list(reward_weights) != list(config.reward_weights)
    ):
        raise ConfigError(
            f"reward_weights={list(reward_weights)} and config.reward_weights={config.reward_weights} differ; pass one"
        )
    weights = reward_weights if reward_weights is not None else config.reward_weights
    if reward_fn is None and config.rewards:
        reward_fn = build_reward(
            config.rewards,
            config.reward_normalize,
            config.reward_clip,
            config.reward_nonfinite,
            base_dir=config.base_dir,
        )
    if reward_fn is None:
        raise TypeError(
            "reward_fn (or reward_funcs) must be a callable fn(prompts, completions, **kwargs) -> list[float], a list "
            "of them, or a reward-model id (or declare rewards: in the config)"
        )
    fns = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
    if not fns:
        raise TypeError("reward_fn is an empty list; give at least one reward function")
    fns = [_as_reward(fn) for fn in fns]
    try:
        return CombinedReward.wrap(
            fns if isinstance(reward_fn, (list, tuple)) else fns[0],
            weights,
            normalize=config.reward_normalize,
            clip=config.reward_clip,
            nonfinite=config.reward_nonfinite,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _as_reward(fn):
    """A reward callable; a string or a ``torch.nn.Module`` is a reward model (as TRL's ``reward_funcs`` takes)."""
    if isinstance(fn, (str, torch.nn.Module)):
        return RewardModelReward(fn)
    if not callable(fn):
        raise TypeError(
            f"reward {fn!r} is not callable: give a function fn(prompts, completions, **kwargs) -> list[float], a "
            f"reward-model id, or a CombinedReward"
        )
    return fn


def _one_of(name: str, value, alias: str, alias_value):
    """``value`` or its TRL-named ``alias_value``; both given (and different) is an error naming both."""
    if value is not None and alias_value is not None and value is not alias_value:
        raise TypeError(f"{name}= and {alias}= name the same argument ({alias} is TRL's name); pass one")
    return value if value is not None else alias_value


def _as_config(config) -> PGConfig:
    if config is None:
        return PGConfig()
    if isinstance(config, dict):
        return PGConfig.from_dict(config)
    if isinstance(config, PGConfig):
        return config
    raise TypeError(f"config must be a PGConfig or a dict, not {type(config).__name__}")
