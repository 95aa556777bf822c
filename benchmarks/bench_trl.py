#!/usr/bin/env python
"""hfpg vs TRL's RLOOTrainer and GRPOTrainer, side by side: step time, tokens/s and peak memory for equal work.

Builds one random tiny GPT-2 and BPE tokenizer (bench_phases.py's), saves them to a temporary folder, and runs each
worker in a fresh process ``--repeats`` times, rotating the order every round: hfpg (REINFORCE with a leave-one-out
baseline, the project venv) and TRL 1.16 RLOO / GRPO (``.venv-peers``, made by ``make bench-trl``). Every worker
loads the same weights, trains on the same prompts with the same reward, batch, fixed completion length, sampling,
KL coefficient, optimizer, dtype and thread count, and times steps the same way (between consecutive
``on_step_end`` callbacks). Prints a markdown table of medians over rounds, the hfpg / TRL ratios and the targets.

    make bench-trl                                                  # creates .venv-peers, then runs this
    .venv/bin/python benchmarks/bench_trl.py --repeats 1 --steps 3 --warmup 1 --json /tmp/trl.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_trl_common import PHASES, default_threads  # noqa: E402

WORKERS = {  # name -> (label, script, extra args, runs in the peers venv)
    "hfpg": ("hfpg REINFORCE+RLOO", "bench_trl_hfpg_worker.py", [], False),
    "trl-rloo": ("TRL RLOOTrainer", "bench_trl_trl_worker.py", ["--trainer", "rloo"], True),
    "trl-grpo": ("TRL GRPOTrainer", "bench_trl_trl_worker.py", ["--trainer", "grpo"], True),
}
CPU_SHARE_WARN = 0.8  # below this, other processes took the cores during a worker's steps
SPEED_TARGET = 0.5  # hfpg step time <= 0.5 x TRL RLOO step time
MEMORY_TARGET = 1.0  # hfpg peak RSS <= TRL's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="rounds of fresh processes (one per worker) to take medians over"
    )
    p.add_argument("--steps", type=int, default=6, help="measured steps per process")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first, per process")
    p.add_argument("--prompts", type=int, default=8, help="distinct prompts per step")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="completions per prompt (k >= 2)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="completion length (min_new_tokens is the same)")
    p.add_argument("--prompt-length", type=int, default=32, help="approximate prompt length in tokens")
    p.add_argument("--num-prompts", type=int, default=64, help="prompts in the training set")
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient: hfpg kl_coef, TRL beta (nonzero)")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="OMP_NUM_THREADS and torch.set_num_threads of every worker",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", default="hfpg,trl-rloo,trl-grpo", help=f"comma-separated subset of {list(WORKERS)}")
    p.add_argument(
        "--peers-python",
        default=os.path.join(ROOT, ".venv-peers", "bin", "python"),
        help="python of the venv with trl (make bench-trl creates .venv-peers)",
    )
    p.add_argument("--python", default=sys.executable, help="python of the venv with hfpg")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="before each worker, wait up to this long for the CPUs to be >= 90%% idle (0 = start at once)",
    )
    p.add_argument("--json", metavar="PATH", default=None, help="also write the runs and the summary as JSON")
    args = p.parse_args(argv)
    for name in ("repeats", "steps", "prompts", "max_new_tokens", "prompt_length", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.samples_per_prompt < 2:
        p.error("--samples-per-prompt must be >= 2 (a leave-one-out baseline needs two samples)")
    if args.beta == 0:
        p.error("--beta must be nonzero, so both sides run the reference model")
    args.workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    unknown = [w for w in args.workers if w not in WORKERS]
    if unknown or not args.workers:
        p.error(f"--workers: unknown {unknown}; choose from {list(WORKERS)}")
    args.num_prompts = max(args.num_prompts, args.prompts)
    return args


# ---- setup -------------------------------------------------------------------------------------------------------
def build_inputs(args, workdir: str) -> tuple[str, str, dict]:
    """Save bench_phases.py's tiny GPT-2 + tokenizer and the prompts, once, for every worker to load."""
    import bench_phases
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model, tokenizer = bench_phases.build_tiny_gpt2(args.seed)
    model_dir = os.path.join(workdir, "tiny-gpt2")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = bench_phases.make_prompts(tokenizer, args.num_prompts, args.prompt_length, args.seed)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    prompts_file = os.path.join(workdir, "prompts.json")
    with open(prompts_file, "w") as f:
        json.dump({"prompts": prompts}, f)
    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "prompt_tokens_mean": statistics.mean(lengths),
        "prompt_tokens_min": min(lengths),
        "prompt_tokens_max": max(lengths),
        "num_prompts": len(prompts),
    }
    return model_dir, prompts_file, info


def worker_command(args, name: str, model_dir: str, prompts_file: str, out: str) -> list[str]:
    _, script, extra, peers = WORKERS[name]
    python = args.peers_python if peers else args.python
    return [
        python,
        os.path.join(HERE, script),
        *extra,
        "--model-dir",
        model_dir,
        "--prompts-file",
        prompts_file,
        "--prompts",
        str(args.prompts),
        "--samples-per-prompt",
        str(args.samples_per_prompt),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--beta",
        repr(args.beta),
        "--learning-rate",
        repr(args.learning_rate),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--json",
        out,
    ]


def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "ACCELERATE_USE_CPU": "true",
            "CUDA_VISIBLE_DEVICES": "",
        }
    )
    env.pop("PYTHONPATH", None)  # each venv sees only its own packages
    return env


def run_worker(args, name: str, model_dir: str, prompts_file: str, workdir: str, round_i: int) -> dict:
    out = os.path.join(workdir, f"{name}-{round_i}.json")
    cmd = worker_command(args, name, model_dir, prompts_file, out)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(args.threads), check=False)
    if proc.returncode != 0:
        sys.exit(
            f"bench_trl: worker {name} failed (exit {proc.returncode}):\n  {' '.join(cmd)}\n"
            f"{(proc.stdout + proc.stderr)[-4000:]}"
        )
    with open(out) as f:
        return json.load(f)


def cpu_idle_fraction(seconds: float = 1.0) -> float | None:
    """Share of all CPUs' time spent idle over ``seconds`` (from /proc/stat; None where it is missing)."""
    import time

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_idle(timeout: float, threshold: float = 0.9) -> float | None:
    """Sample CPU idleness until it reaches ``threshold`` or ``timeout`` seconds pass; the last sample."""
    import time

    if timeout <= 0:
        return None
    deadline = time.monotonic() + timeout
    while True:
        idle = cpu_idle_fraction()
        if idle is None or idle >= threshold or time.monotonic() >= deadline:
            return idle


def rotate(names: list[str], i: int) -> list[str]:
    k = i % len(names)
    return names[k:] + names[:k]


# ---- summary (pure functions: tests/test_bench_trl.py checks them on synthetic runs) ------------------------------
def run_stats(run: dict) -> dict:
    """One worker process: median step time, tokens per step, tokens/s (= tokens per step / step time), memory."""
    step = statistics.median(run["step_seconds"])
    tokens = statistics.median(run["tokens_per_step"])
    stats = {
        "step_seconds": step,
        "best_step_seconds": min(run["step_seconds"]),
        "tokens_per_step": tokens,
        "tokens_per_second": tokens / step,
        "peak_rss_mib": run["peak_rss_mib"],
        "setup_rss_mib": run["setup_rss_mib"],
        "completion_length_mean": run["completion_length_mean"],
        "setup_seconds": run["setup_seconds"],
    }
    if run.get("cpu_seconds"):
        stats["cpu_seconds"] = statistics.median(run["cpu_seconds"])
        threads = (run.get("settings") or {}).get("threads") or run.get("threads")
        if threads:  # process CPU time / (wall time x threads): about 1 when the worker had its cores to itself
            stats["cpu_share"] = statistics.median(
                c / (t * threads) for c, t in zip(run["cpu_seconds"], run["step_seconds"])
            )
    for k, values in (run.get("phase_seconds") or {}).items():
        stats[f"phase/{k}"] = statistics.median(values)
    return stats


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians over rounds of each worker's per-process figures, and hfpg / TRL ratios of them."""
    workers = {}
    for name, rs in runs.items():
        per_round = [run_stats(r) for r in rs]
        keys = [k for k in per_round[0] if all(k in s for s in per_round)]
        workers[name] = {k: statistics.median(s[k] for s in per_round) for k in keys}
        workers[name]["best_step_seconds"] = min(s["best_step_seconds"] for s in per_round)  # over all rounds
        workers[name]["rounds"] = len(rs)
        workers[name]["step_seconds_per_round"] = [s["step_seconds"] for s in per_round]
        workers[name]["peak_rss_mib_per_round"] = [s["peak_rss_mib"] for s in per_round]
        workers[name]["versions"] = rs[0].get("versions", {})
    ratios = {}
    if "hfpg" in workers:
        h = workers["hfpg"]
        for name, w in workers.items():
            if name != "hfpg":
                ratios[name] = {
                    k: h[k] / w[k]
                    for k in (
                        "step_seconds",
                        "best_step_seconds",
                        "tokens_per_second",
                        "peak_rss_mib",
                        "setup_rss_mib",
                        "cpu_seconds",
                    )
                    if k in h and k in w
                }
    tokens = {name: w["tokens_per_step"] for name, w in workers.items()}
    lengths = {name: w["completion_length_mean"] for name, w in workers.items()}
    equal = len(set(tokens.values())) == 1 and len(set(lengths.values())) == 1
    return {
        "workers": workers,
        "ratios": ratios,
        "equal_work": {"ok": equal, "tokens_per_step": tokens, "completion_length_mean": lengths},
    }


def _target(
    name: str, goal: str, value: float, bound: float, ratio: float, limit: float, unit: str, fmt: str, miss_note: str
) -> dict:
    """One target: met when ``value <= bound``; the detail says by how much either way (``miss_note`` follows the
    ratio in the parenthesis of a miss)."""
    met = value <= bound
    if met:
        detail = (
            f"met: {value:{fmt}} {unit} <= {bound:{fmt}} {unit} (ratio {ratio:.2f}, "
            f"{bound - value:{fmt}} {unit} to spare)"
        )
    else:
        detail = (
            f"MISSED by {value - bound:{fmt}} {unit}: {value:{fmt}} {unit} > {bound:{fmt}} {unit} "
            f"(ratio {ratio:.2f}{miss_note}"
        )
    return {
        "name": name,
        "goal": goal,
        "ratio": ratio,
        "limit": limit,
        "met": met,
        "hfpg": value,
        "bound": bound,
        "detail": detail,
    }


def check_targets(summary: dict) -> list[dict]:
    """The two targets: hfpg step time <= 0.5 x TRL RLOO's; hfpg peak RSS <= each TRL trainer's."""
    w, targets = summary["workers"], []
    if "hfpg" not in w:
        return targets
    h = w["hfpg"]
    if "trl-rloo" in w:
        t, bound = h["step_seconds"], SPEED_TARGET * w["trl-rloo"]["step_seconds"]
        targets.append(
            _target(
                "step time",
                f"hfpg <= {SPEED_TARGET:g} x TRL RLOO",
                t,
                bound,
                t / w["trl-rloo"]["step_seconds"],
                SPEED_TARGET,
                "s",
                ".3f",
                f" > {SPEED_TARGET:g}); hfpg's step must get {(1 - bound / t) * 100:.0f}% shorter",
            )
        )
    for name in ("trl-rloo", "trl-grpo"):
        if name in w:
            m, bound = h["peak_rss_mib"], MEMORY_TARGET * w[name]["peak_rss_mib"]
            ratio = m / w[name]["peak_rss_mib"]
            targets.append(
                _target(
                    f"peak memory vs {name}",
                    f"hfpg peak RSS <= {WORKERS[name][0]}'s",
                    m,
                    bound,
                    ratio,
                    MEMORY_TARGET,
                    "MiB",
                    ".0f",
                    f", {(ratio - 1) * 100:.0f}% over)",
                )
            )
    return targets


def format_table(summary: dict) -> str:
    """Markdown: one column per worker plus hfpg / TRL ratio columns."""
    w, ratios = summary["workers"], summary["ratios"]
    names = list(w)
    others = [n for n in names if n in ratios]
    head = [
        "",
        *[WORKERS.get(n, (n,))[0] for n in names],
        *[f"hfpg / {WORKERS.get(n, (n,))[0].replace('TRL ', '').replace('Trainer', '')}" for n in others],
    ]
    rows = [
        ("step time (s, median)", "step_seconds", "{:.3f}", True),
        ("step time (s, fastest step of all rounds)", "best_step_seconds", "{:.3f}", True),
        ("tokens/s (prompt+completion)", "tokens_per_second", "{:.0f}", True),
        ("process CPU time per step (s)", "cpu_seconds", "{:.2f}", True),
        ("CPU time / (step time x threads)", "cpu_share", "{:.2f}", False),
        ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}", True),
        ("RSS after setup (MiB)", "setup_rss_mib", "{:.0f}", True),
        ("tokens per step", "tokens_per_step", "{:.0f}", False),
        ("mean completion length", "completion_length_mean", "{:.1f}", False),
        ("setup time (s)", "setup_seconds", "{:.1f}", False),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, fmt, with_ratio in rows:
        if not all(key in w[n] for n in names):
            continue
        cells = [fmt.format(w[n][key]) for n in names]
        cells += [f"{ratios[n][key]:.2f}" if with_ratio and key in ratios[n] else "" for n in others]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_phase_table(summary: dict) -> str:
    """Markdown: median seconds per step in each phase (the same boundaries on both sides), empty if not timed."""
    w = summary["workers"]
    names = [n for n in w if f"phase/{PHASES[0]}" in w[n]]
    if not names:
        return ""
    labels = {
        "generate": "generate",
        "policy_forward": "policy forward for old log-probs (TRL RLOO: no-grad; hfpg: the update's own)",
        "rest": "rest: loss forward (TRL) + backward + optimizer + bookkeeping",
        "ref_forward": "reference forward",
        "reward": "reward",
    }
    lines = [
        "| phase (median s per step) | " + " | ".join(WORKERS.get(n, (n,))[0] for n in names) + " |",
        "|" + "---|" * (len(names) + 1),
    ]
    for k in (*PHASES, "rest"):
        lines.append(
            f"| {labels[k]} | " + " | ".join(f"{w[n].get(f'phase/{k}', float('nan')):.3f}" for n in names) + " |"
        )
    return "\n".join(lines)


def format_targets(targets: list[dict]) -> str:
    return "\n".join(f"- {t['goal']}: {t['detail']}" for t in targets)


# ---- main --------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if any(WORKERS[n][3] for n in args.workers) and not os.path.exists(args.peers_python):
        sys.exit(
            f"bench_trl: {args.peers_python} not found; `make bench-trl` creates .venv-peers with trl, or pass "
            f"--peers-python"
        )
    runs: dict[str, list[dict]] = {n: [] for n in args.workers}
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as workdir:
        model_dir, prompts_file, info = build_inputs(args, workdir)
        print(
            f"tiny GPT-2 ({info['params'] / 1e6:.2f}M params, vocab {info['vocab']}) | {args.prompts} prompts x "
            f"{args.samples_per_prompt} samples = {args.prompts * args.samples_per_prompt} sequences/step | "
            f"prompt {info['prompt_tokens_mean']:.1f} tokens | {args.max_new_tokens} new tokens | beta "
            f"{args.beta:g} | {args.threads} threads | {args.warmup} warm-up + {args.steps} measured steps | "
            f"{args.repeats} round(s)",
            flush=True,
        )
        for i in range(args.repeats):
            for name in rotate(args.workers, i):
                idle = wait_until_idle(args.wait_idle)
                if idle is not None and idle < 0.9:
                    print(
                        f"note: CPUs only {idle:.0%} idle after waiting {args.wait_idle:g} s; starting {name} anyway",
                        flush=True,
                    )
                r = run_worker(args, name, model_dir, prompts_file, workdir, i)
                runs[name].append(r)
                s = run_stats(r)
                print(
                    f"round {i + 1}/{args.repeats} {name:>9}: step {s['step_seconds']:.3f} s, "
                    f"{s['tokens_per_second']:.0f} tokens/s, peak {s['peak_rss_mib']:.0f} MiB, "
                    f"completion length {s['completion_length_mean']:.1f}, CPU share "
                    f"{s.get('cpu_share', float('nan')):.2f}",
                    flush=True,
                )
    summary = summarize(runs)
    targets = check_targets(summary)
    versions = {k: v for n in summary["workers"] for k, v in summary["workers"][n]["versions"].items()}
    print()
    print(format_table(summary))
    print()
    phases = format_phase_table(summary)
    if phases:
        print(phases)
        print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    eq = summary["equal_work"]
    if not eq["ok"]:
        print(
            f"WARNING: unequal work: tokens per step {eq['tokens_per_step']}, completion length "
            f"{eq['completion_length_mean']}"
        )
    elif any(abs(v - args.max_new_tokens) > 1e-9 for v in eq["completion_length_mean"].values()):
        print(f"WARNING: mean completion length {eq['completion_length_mean']} != {args.max_new_tokens}")
    busy = [
        f"{n} {w['cpu_share']:.2f}" for n, w in summary["workers"].items() if w.get("cpu_share", 1.0) < CPU_SHARE_WARN
    ]
    if busy:
        print(
            f"WARNING: other processes competed for the cores (CPU share {', '.join(busy)} < {CPU_SHARE_WARN}): "
            f"medians are "
            f"inflated and ratios unreliable; the fastest-step row is the better guide, or rerun on a quiet machine"
        )
    if targets:
        print("targets:")
        print(format_targets(targets))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "model": info, "summary": summary, "targets": targets, "runs": runs}, f, indent=2
            )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
