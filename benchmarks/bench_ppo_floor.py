#!/usr/bin/env python
"""hfpg's PPO step against its floor, timed alternately in one process on the same model, prompts and lengths.

The floor is the work no PPO step can skip: generate the batch, one reference forward, and per epoch one policy
forward/backward (logprobs and values) over every minibatch with its optimizer step. A PPO step adds the
rollout-time policy forward (the "old" logprobs and values), the reward, advantages (KL-shaped rewards, GAE,
whitening) and metrics. Target: step / floor <= 1.2.

    .venv/bin/python benchmarks/bench_ppo_floor.py                    # tiny GPT-2, offline, about 1 minute
    .venv/bin/python benchmarks/bench_ppo_floor.py --ppo-epochs 1 --json /tmp/floor.json
    .venv/bin/python benchmarks/bench_ppo_floor.py --model gpt2 --device auto --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET = 1.2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="tiny-gpt2", help="tiny-gpt2 | smollm2 | a Hub id / local path")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mini-batch-size", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=4, help="PPO epochs (PGConfig's default is 4)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="fixed completion length (min = max)")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="measured (PPO step, floor step) pairs")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured pairs first")
    p.add_argument("--device", choices=("auto", "cpu"), default="cpu")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", default=None)
    return p.parse_args(argv)


def floor_step(trainer, prompts: list[str]) -> dict[str, float]:
    """Generate + reference forward + epochs × (policy forward/backward + optimizer step per minibatch)."""
    import torch

    from hfpg.forward import sequence_forward
    from hfpg.modeling import reference_context
    from hfpg.rollout import generate_responses, tokenize_prompts

    cfg, acc, tok = trainer.config, trainer.accelerator, trainer.tokenizer
    policy, clock = trainer.unwrapped_model, trainer._clock
    times = {}
    t0 = clock()
    with torch.no_grad():
        policy.eval()
        q, qm = tokenize_prompts(tok, prompts, cfg.max_prompt_length, acc.device)
        with acc.autocast():
            r, rm, _ = generate_responses(
                policy, q, qm, trainer.generation_config, trainer.stop_token_ids, tok.pad_token_id
            )
        times["generate"] = clock() - t0
        t = clock()
        with acc.autocast(), reference_context(policy, trainer.ref_model) as ref:
            sequence_forward(ref, q, qm, r, rm, temperature=cfg.temperature, with_values=False)
        times["ref_forward"] = clock() - t
    t = clock()
    trainer.model.train()
    n = r.shape[0]
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n)
        for start in range(0, n, cfg.mini_batch_size):
            idx = perm[start : start + cfg.mini_batch_size]
            with acc.autocast():
                out = sequence_forward(
                    trainer.model, q[idx], qm[idx], r[idx], rm[idx], temperature=cfg.temperature, with_values=True
                )
            loss = -(out["logprobs"].sum() - 0.5 * (out["values"] ** 2).sum()) / rm[idx].sum()
            acc.backward(loss)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
    times["update"] = clock() - t
    times["step"] = clock() - t0
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_phases import build_tiny_gpt2, char_fraction_reward, load_model, make_prompts

    from hfpg import PGConfig, PGTrainer

    model, tok = build_tiny_gpt2(args.seed) if args.model == "tiny-gpt2" else load_model(args.model)
    prompts = make_prompts(tok, max(64, args.batch_size), args.prompt_length, args.seed)
    tmp = tempfile.TemporaryDirectory(prefix="hfpg-floor-")
    steps = args.warmup + args.rounds
    cfg = PGConfig(
        output_dir=tmp.name,
        seed=args.seed,
        report_to=[],
        disable_tqdm=True,
        max_steps=steps,
        lr_scheduler_type="constant",
        rollout_batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size,
        ppo_epochs=args.ppo_epochs,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        mixed_precision=args.mixed_precision,
    )
    trainer = PGTrainer(model, tok, cfg, train_dataset=[{"prompt": p} for p in prompts], reward_fn=char_fraction_reward)
    ppo, floor = [], []
    for i in range(steps):
        batch = [prompts[(i * args.batch_size + j) % len(prompts)] for j in range(args.batch_size)]
        # alternate which one goes first, so neither always runs on a warmer cache
        order = ("ppo", "floor") if i % 2 == 0 else ("floor", "ppo")
        for which in order:
            if which == "ppo":
                m = trainer.step()
                trainer.global_step += 1
                rec = {k[5:]: v for k, v in m.items() if k.startswith("time/") and "per_second" not in k}
            else:
                rec = floor_step(trainer, batch)
            if i >= args.warmup:
                (ppo if which == "ppo" else floor).append(rec)
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    ratios = [p["step"] / f["step"] for p, f in zip(ppo, floor)]
    result = {
        "model": args.model,
        "device": str(trainer.accelerator.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "mini_batch_size": args.mini_batch_size,
        "ppo_epochs": args.ppo_epochs,
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "ppo_step_ms": 1e3 * med(ppo, "step"),
        "floor_step_ms": 1e3 * med(floor, "step"),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "ppo_phases_ms": {
            k: 1e3 * med(ppo, k) for k in ("generate", "policy_forward", "ref_forward", "reward", "update")
        },
        "floor_phases_ms": {k: 1e3 * med(floor, k) for k in ("generate", "ref_forward", "update")},
    }
    r = result
    print(
        f"PPO step vs its floor: {r['model']} on {r['device']} ({r['threads']} threads, torch {r['torch']}), "
        f"{r['batch_size']} sequences × {r['max_new_tokens']} new tokens, {r['ppo_epochs']} epochs × "
        f"{r['batch_size'] // r['mini_batch_size']} minibatches, {r['rounds']} alternating rounds"
    )
    print("| phase | PPO step (ms) | floor (ms) |\n|---|---|---|")
    pp, fp = r["ppo_phases_ms"], r["floor_phases_ms"]
    print(f"| generate | {pp['generate']:.0f} | {fp['generate']:.0f} |")
    label = (
        "policy forward (the update's own, reused: fuse_policy_forward)"
        if trainer.algorithm.fuses_policy_forward
        else "policy forward (old logprobs + values)"
    )
    print(f"| {label} | {pp['policy_forward']:.0f} | — |")
    print(f"| reference forward | {pp['ref_forward']:.0f} | {fp['ref_forward']:.0f} |")
    print(f"| reward | {pp['reward']:.1f} | — |")
    print(f"| update (advantages + optimizer steps) | {pp['update']:.0f} | {fp['update']:.0f} |")
    print(f"| whole step | {r['ppo_step_ms']:.0f} | {r['floor_step_ms']:.0f} |")
    verdict = "met" if r["ratio_median"] <= TARGET else f"MISSED by {100 * (r['ratio_median'] / TARGET - 1):.0f} %"
    print(f"median ratio PPO / floor = {r['ratio_median']:.2f} (target <= {TARGET}: {verdict})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
