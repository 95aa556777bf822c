#!/usr/bin/env python
"""bench_trl.py's TRL side: RLOOTrainer or GRPOTrainer (trl 1.16) on the same model, prompts, reward and work.

Runs in .venv-peers (trl, transformers, datasets, torch; hfpg is not imported). One generation batch of
``prompts x k`` completions is one optimizer step: per_device_train_batch_size = prompts x k,
gradient_accumulation_steps = steps_per_generation = num_iterations = 1. Step times are taken at ``on_step_end``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ACCELERATE_USE_CPU", "true")

from bench_trl_common import (
    StepClock,
    char_fraction_reward,
    current_rss_mib,
    load_prompts,
    settings_of,
    worker_args,
    write_result,
)


def trl_config_kwargs(args, output_dir: str) -> dict:
    """The RLOOConfig / GRPOConfig keys both trainers take, set to the work hfpg does."""
    return dict(
        output_dir=output_dir,
        seed=args.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        # TRL's default is True; hfpg does not checkpoint (transformers 5 renamed it activation_checkpointing)
        gradient_checkpointing=False,
        activation_checkpointing=False,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,  # generate once per optimizer step, one pass over it
        num_generations=args.samples_per_prompt,
        max_completion_length=args.max_new_tokens,
        generation_kwargs={"min_new_tokens": args.max_new_tokens},  # fixed-length completions, as hfpg
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        beta=args.beta,  # nonzero: the reference model is loaded and run every step
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",  # torch.optim.AdamW, as hfpg (TRL's default is the fused one)
        disable_dropout=True,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )


def time_phases(trainer, acc: dict) -> None:
    """Wrap the trainer's generation, log-prob forwards and reward calls with clocks that add into ``acc``.

    Same phase boundaries as PGTrainer's ``time/*`` metrics: generate (tokenized prompts -> completion ids), the
    no-grad policy forward (RLOO: old log-probs for the KL penalty; GRPO with one iteration skips it), the reference
    forward, the reward call. The loss forward (with grad) is left in "rest", with backward and the optimizer step.
    """
    import functools

    import torch

    def clocked(fn, key_of):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                key = key_of(a, kw)
                if key is not None:
                    acc[key] = acc.get(key, 0.0) + time.perf_counter() - t

        return wrapper

    def forward_key(a, kw):
        if torch.is_grad_enabled():
            return None  # the loss forward
        model = a[0] if a else kw.get("model")
        return "ref_forward" if model is trainer.ref_model else "policy_forward"

    trainer._generate_single_turn = clocked(trainer._generate_single_turn, lambda a, kw: "generate")
    trainer._get_per_token_logps_and_entropies = clocked(trainer._get_per_token_logps_and_entropies, forward_key)
    trainer._calculate_rewards = clocked(trainer._calculate_rewards, lambda a, kw: "reward")


def checkpointing(model) -> bool:
    """Whether the policy recomputes activations in backward (transformers 5 renamed the flag)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_name = "rloo"
    if "--trainer" in argv:
        i = argv.index("--trainer")
        trainer_name = argv[i + 1]
        del argv[i : i + 2]
    if trainer_name not in ("rloo", "grpo"):
        sys.exit(f"--trainer must be rloo or grpo, not {trainer_name!r}")
    args = worker_args(__doc__.split("\n\n")[0], argv)
    import torch

    torch.set_num_threads(args.threads)
    import accelerate
    import datasets
    import transformers
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    clock = StepClock()
    phase_acc: dict[str, float] = {}
    completion_lengths: list[list[int]] = []

    def reward(prompts, completions, completion_ids=None, **kwargs):
        completion_lengths.append([len(ids) for ids in completion_ids])  # tokens, the stop token included
        return char_fraction_reward(prompts, completions)

    reward.__name__ = "char_fraction"

    class Clock(TrainerCallback):
        def __init__(self):
            self.seen = 0

        def on_train_begin(self, args_, state, control, **kwargs):
            clock.begin()
            self.seen = state.num_input_tokens_seen

        def on_step_end(self, args_, state, control, **kwargs):
            # TRL adds prompt tokens (unpadded) + completion tokens of each generation batch to num_input_tokens_seen
            tokens, self.seen = state.num_input_tokens_seen - self.seen, state.num_input_tokens_seen
            lengths = completion_lengths[-1]
            clock.end_step(tokens, sum(lengths) / len(lengths), dict(phase_acc))
            phase_acc.clear()

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = load_prompts(args.prompts_file)
    dataset = datasets.Dataset.from_dict({"prompt": prompts})
    tmp = tempfile.TemporaryDirectory(prefix=f"bench-trl-{trainer_name}-")
    kwargs = trl_config_kwargs(args, tmp.name)
    if trainer_name == "rloo":
        config = trl.RLOOConfig(**kwargs, normalize_advantages=False)
        trainer_cls = trl.RLOOTrainer
    else:
        config = trl.GRPOConfig(**kwargs)  # loss_type "dapo", scale_rewards "group": TRL's defaults
        trainer_cls = trl.GRPOTrainer
    config.model_init_kwargs = {"dtype": torch.float32}
    trainer = trainer_cls(
        model=args.model_dir,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    time_phases(trainer, phase_acc)
    setup = {"seconds": time.perf_counter() - t0, "rss_mib": current_rss_mib()}
    trainer.train()
    assert config.steps_per_generation == 1 and config.generation_batch_size == args.batch, (
        config.steps_per_generation,
        config.generation_batch_size,
    )
    if len(completion_lengths) != args.warmup + args.steps:
        raise RuntimeError(
            f"expected one generation per step, got {len(completion_lengths)} for {args.warmup + args.steps} steps"
        )
    model = trainer.accelerator.unwrap_model(trainer.model)
    n_ref = sum(p.numel() for p in trainer.ref_model.parameters()) if trainer.ref_model is not None else 0
    write_result(
        args.json,
        f"trl-{trainer_name}",
        clock,
        args.warmup,
        settings_of(args),
        {
            "trl": trl.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
        },
        setup,
        extra={
            "threads": torch.get_num_threads(),
            "device": str(trainer.accelerator.device),
            "params_policy": sum(p.numel() for p in model.parameters()),
            "params_reference": n_ref,
            "optimizer": type(
                trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
            ).__name__,
            "loss_type": getattr(config, "loss_type", "rloo (sequence-level clipped)"),
            "generations": len(completion_lengths),
            "checkpointing": checkpointing(model),
            "dtype": str(next(model.parameters()).dtype),
        },
    )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
