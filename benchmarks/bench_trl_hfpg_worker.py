#!/usr/bin/env python
"""bench_trl.py's hfpg side: REINFORCE with a leave-one-out (RLOO) baseline through ``PGTrainer.train()``.

Runs in the project venv. Loads the model bench_trl.py saved, trains ``warmup + steps`` steps of ``prompts x k``
fixed-length completions each (one optimizer step per batch), and writes per-step times taken at ``on_step_end``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # read when PGTrainer builds its Accelerator

from bench_trl_common import (
    PHASES,
    StepClock,
    char_fraction_reward,
    current_rss_mib,
    load_prompts,
    settings_of,
    worker_args,
    write_result,
)


def main(argv=None) -> int:
    args = worker_args(__doc__.split("\n\n")[0], argv)
    import torch

    torch.set_num_threads(args.threads)
    import accelerate
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfpg
    from hfpg import PGConfig, PGTrainer
    from hfpg.callbacks import TrainerCallback

    clock = StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, trainer) -> None:
            clock.begin()

        def on_step_end(self, trainer, step, metrics) -> None:
            r = trainer.last_rollout  # prompt tokens (unpadded) + completion tokens (stop token included)
            tokens = int(r.prompt_mask.sum()) + int(r.response_mask.sum())
            phases = {k: metrics[f"time/{k}"] for k in PHASES}  # PGTrainer's own per-phase clock
            clock.end_step(tokens, float(r.response_mask.sum(1).float().mean()), phases)

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    prompts = load_prompts(args.prompts_file)
    tmp = tempfile.TemporaryDirectory(prefix="bench-trl-hfpg-")
    total = args.warmup + args.steps
    config = PGConfig(
        output_dir=tmp.name,
        seed=args.seed,
        report_to=[],
        disable_tqdm=True,
        max_steps=total,
        logging_steps=total,
        save_steps=0,
        eval_steps=0,
        algorithm="reinforce",
        advantage_estimator="returns",
        baseline="leave_one_out",
        num_samples_per_prompt=args.samples_per_prompt,
        rollout_batch_size=args.batch,
        mini_batch_size=args.batch,
        gradient_accumulation_steps=1,
        whiten_advantages=False,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        kl_penalty="reward",
        kl_estimator="k1",
        kl_coef=args.beta,
        adaptive_kl=False,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        mixed_precision="no",
        disable_dropout=True,
    )
    trainer = PGTrainer(
        model,
        tokenizer,
        config,
        train_dataset=[{"prompt": p} for p in prompts],
        reward_fn=char_fraction_reward,
        callbacks=[Clock()],
    )
    setup = {"seconds": time.perf_counter() - t0, "rss_mib": current_rss_mib()}
    trainer.train()
    n_ref = sum(p.numel() for p in trainer.ref_model.parameters()) if trainer.ref_model is not None else 0
    write_result(
        args.json,
        "hfpg",
        clock,
        args.warmup,
        settings_of(args),
        {
            "hfpg": hfpg.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
        setup,
        extra={
            "threads": torch.get_num_threads(),
            "device": str(trainer.accelerator.device),
            "params_policy": sum(p.numel() for p in trainer.unwrapped_model.parameters()),
            "params_reference": n_ref,
            "per_step_work": "generate; reference forward; reward; 1 policy forward "
            "(its detached logprobs are the old ones: fuse_policy_forward); RLOO "
            "advantages; 1 backward; 1 AdamW step",
            "fuses_policy_forward": trainer.algorithm.fuses_policy_forward,
        },
    )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
