#!/usr/bin/env python
"""Which update rule learns fastest per sample: hfpg's PPO / RLOO / GRPO / DAPO against TRL's RLOO and GRPO.

On the offline demo task (SmolLM2-135M-Instruct + LoRA r16, chat-templated everyday topics, reward = VADER
positivity x 1 + LM likelihood x 0.05), every method trains on the same sample budget (completions generated),
``--seeds`` times, each run in a fresh process with one torch thread, ``--parallel`` runs at a time. One evaluator
(bench_learning_eval.py, imported by both workers) samples the held-out prompts at step 0, every ``--eval-every``
steps' worth of samples and at the end, and records held-out reward and KL to the reference against samples seen.
Writes a JSON of every evaluation, a PNG (reward and KL against samples; mean over seeds, min-max shaded), prints a
markdown table and the target: at equal samples, hfpg's best rule reaches a held-out reward >= TRL's best at a KL
no larger.

    make bench-learning                          # the defaults: 256 samples per run, 3 evaluations, ~90 min on 2 cores
    make bench-learning BENCH_LEARNING_ARGS="--steps 24 --eval-every 4"   # the README's figures, ~150 min
    .venv/bin/python benchmarks/bench_learning.py --smoke --methods hfpg-rloo,trl-rloo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RECIPE = os.path.join(ROOT, "recipes", "configs", "ppo_smollm2_sentiment.yaml")

# One line per method: which side runs it, and its config overrides (hfpg: PGConfig keys on top of the demo recipe;
# TRL: RLOOConfig / GRPOConfig keys on top of the shared settings). "minibatches" (hfpg): optimizer steps per epoch.
# Every hfpg method keeps the demo's kl_coef (= --beta) and k3 estimator; see KL_NOTE.
METHODS: dict[str, dict] = {
    "hfpg-ppo": {"side": "hfpg", "label": "hfpg PPO (value head)", "minibatches": 2, "config": {}},  # the demo
    "hfpg-ppo-critic": {
        "side": "hfpg",
        "label": "hfpg PPO (LoRA critic)",
        "minibatches": 2,
        "config": {"value_model": "policy"},
    },
    "hfpg-rloo": {
        "side": "hfpg",
        "label": "hfpg RLOO",
        "config": {
            "algorithm": "reinforce",
            "advantage_estimator": "returns",
            "baseline": "leave_one_out",
            "num_samples_per_prompt": 4,
        },
    },
    "hfpg-grpo": {
        "side": "hfpg",
        "label": "hfpg GRPO-style",
        "config": {
            "algorithm": "ppo",
            "advantage_estimator": "returns",
            "baseline": "group_norm",
            "loss_type": "grpo",
            "ppo_epochs": 1,
            "num_samples_per_prompt": 4,
            "kl_penalty": "loss",
        },
    },
    "hfpg-dapo": {
        "side": "hfpg",
        "label": "hfpg DAPO-style",
        "minibatches": 2,
        # clip-higher only matters with more than one pass (ratio 1 on the first); no overlong masking: at 24 new
        # tokens most completions hit the limit, so masking them would train on a few samples per step
        "config": {
            "algorithm": "ppo",
            "advantage_estimator": "returns",
            "baseline": "group_norm",
            "loss_type": "dapo",
            "clip_range_high": 0.28,
            "dynamic_sampling": True,
            "ppo_epochs": 2,
            "num_samples_per_prompt": 4,
            "kl_penalty": "loss",
        },
    },
    "trl-rloo": {"side": "trl", "trainer": "rloo", "label": "TRL RLOOTrainer", "config": {}},  # TRL's defaults
    "trl-grpo": {"side": "trl", "trainer": "grpo", "label": "TRL GRPOTrainer", "config": {}},  # loss_type "dapo"
}


def variant(base: str, label: str, **config) -> dict:
    """An optional method: ``base`` with config overrides, run only when ``--methods`` names it."""
    return {
        **METHODS[base],
        "label": label,
        "optional": True,
        "base": base,
        "config": {**METHODS[base]["config"], **config},
    }


# not in the default run: the critic PPO with a stronger KL penalty in the reward, the critic PPO with the KL as a loss
# term (kl_penalty: loss, as GRPO) at several kl_coef (its reward against KL frontier), and GRPO-style with TRL's
# advantage scaling (tests the whitening default of group_norm)
METHODS["hfpg-ppo-critic-kl0.3"] = variant("hfpg-ppo-critic", "hfpg PPO (LoRA critic), kl_coef 0.3", kl_coef=0.3)
METHODS["hfpg-ppo-critic-klloss"] = variant(
    "hfpg-ppo-critic", "hfpg PPO (LoRA critic), KL as a loss term", kl_penalty="loss"
)
for _beta in (0.15, 0.18, 0.2, 0.3):
    METHODS[f"hfpg-ppo-critic-klloss{_beta}"] = variant(
        "hfpg-ppo-critic",
        f"hfpg PPO (LoRA critic), KL as a loss term, kl_coef {_beta}",
        kl_penalty="loss",
        kl_coef=_beta,
    )
METHODS["hfpg-grpo-unwhitened"] = variant("hfpg-grpo", "hfpg GRPO-style, unwhitened", whiten_advantages=False)

KL_NOTE = (
    "beta = kl_coef = 0.1 on every side (the optional variants: the kl_coef in their name). hfpg PPO / RLOO: -beta * "
    "k3 per token in the reward (the demo); hfpg GRPO / DAPO-style and the critic PPO variants 'KL as a loss term': "
    "beta * k3 per token as a loss term (kl_penalty: loss), "
    "weighted by the token's importance ratio (use_bias_correction_kl), as TRL GRPO; TRL RLOO: -beta * (sum of k1 over "
    "the completion) in the sequence reward (its only form); TRL GRPO: beta * k3 per token in the loss, weighted by "
    "the importance ratio (its default use_bias_correction_kl)"
)
# seconds per training step at 1 thread, 16 completions x 24 new tokens, two runs sharing 2 cores (for the ETA;
# medians of runs[*].step_seconds, 5 runs of 24 steps 2 at a time on idle cores; a variant counts as its base)
STEP_SECONDS = {
    "hfpg-ppo": 38.0,
    "hfpg-ppo-critic": 58.0,
    "hfpg-rloo": 25.0,
    "hfpg-grpo": 26.5,
    "hfpg-dapo": 39.0,
    "trl-rloo": 38.0,
    "trl-grpo": 38.0,
}
DEFAULT_STEP_SECONDS = 38.0
EVAL_SECONDS_PER_PROMPT = 1.55  # one evaluation: generate + 2 forwards + rewards, per held-out prompt at 24 tokens
SETUP_SECONDS = 40.0  # process start, imports, model and reward models loaded


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    default_methods = [m for m, spec in METHODS.items() if not spec.get("optional")]
    p.add_argument(
        "--methods",
        default=",".join(default_methods),
        help=f"comma-separated subset of {list(METHODS)} (the ones marked optional run only when named)",
    )
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; every method runs each")
    p.add_argument(
        "--steps", type=int, default=16, help="budget in steps: budget = steps x samples-per-step (24: ~1.5x the time)"
    )
    p.add_argument("--samples-per-step", type=int, default=16, help="completions generated per step (a multiple of 4)")
    p.add_argument("--eval-every", type=int, default=8, help="evaluate every this many steps' worth of samples")
    p.add_argument("--eval-prompts", type=int, default=24, help="held-out prompts evaluated (the demo's 24 at most)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--beta", type=float, default=0.1, help="KL coefficient: hfpg kl_coef, TRL beta")
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (each with --threads torch threads)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "outputs", "bench_learning"))
    p.add_argument("--json", default=None, help="results JSON (default OUT_DIR/bench_learning.json)")
    p.add_argument("--plot", default=None, help="PNG (default OUT_DIR/bench_learning.png; 'none' = no plot)")
    p.add_argument("--python", default=sys.executable, help="python of the venv with hfpg")
    p.add_argument("--peers-python", default=os.path.join(ROOT, ".venv-peers", "bin", "python"))
    p.add_argument("--smoke", action="store_true", help="plumbing check: 2 steps of 8, 4 eval prompts, 8 tokens")
    p.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="JSON",
        help="run nothing: summarise and plot together the runs of earlier result JSONs or --out-dir folders (same "
        "settings)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.samples_per_step, args.eval_every, args.eval_prompts, args.max_new_tokens = 2, 8, 1, 4, 8
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.samples_per_step % 4:
        p.error("--samples-per-step must be a multiple of 4 (the group size k of RLOO / GRPO)")
    if min(args.steps, args.eval_every, args.parallel, args.eval_prompts) < 1 or not args.seeds:
        p.error("--steps, --eval-every, --parallel, --eval-prompts must be >= 1 and --seeds non-empty")
    args.json = args.json or os.path.join(args.out_dir, "bench_learning.json")
    args.plot = args.plot or os.path.join(args.out_dir, "bench_learning.png")
    return args


# ---- preparation (project venv: hfpg is importable here) ------------------------------------------------------------
def prepare(args) -> str:
    """The shared spec: the de-quantised model folder, the demo's train / held-out split with the chat template
    applied, the reward specs with absolute paths, the settings. Returns the spec path."""
    from transformers import AutoTokenizer

    from hfpg.recipe import load_prompts, load_recipe
    from hfpg.sources import materialize_gguf, relative_to

    recipe = load_recipe(RECIPE)
    model_dir = materialize_gguf(recipe.model.name_or_path, recipe.model.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, evals = load_prompts(recipe.data, tokenizer, recipe.base_dir, recipe.training.seed)
    rewards = []
    for r in recipe.raw["rewards"]:
        r = json.loads(json.dumps(r))
        if ":" in r["name"]:
            path, fn = r["name"].rsplit(":", 1)
            r["name"] = f"{relative_to(path, recipe.base_dir)}:{fn}"
        kw = r.get("kwargs") or {}
        gguf = (kw.get("model_kwargs") or {}).pop("gguf_file", None)
        if gguf:  # the scoring LM: the same de-quantised folder (the peers venv has no gguf)
            kw["model"] = materialize_gguf(kw["model"], gguf)
        rewards.append(r)
    os.makedirs(args.out_dir, exist_ok=True)
    train_file = os.path.join(args.out_dir, "train_prompts.jsonl")
    with open(train_file, "w") as f:
        for p in train["prompt"]:
            f.write(json.dumps({"prompt": p}) + "\n")
    spec = {
        "recipe": RECIPE,
        "model_dir": model_dir,
        "peft": dict(recipe.model.peft),
        "train_file": train_file,
        "train_prompts": list(train["prompt"]),
        "eval_prompts": list(evals["prompt"])[: args.eval_prompts],
        "rewards": rewards,
        "settings": {
            "samples_per_step": args.samples_per_step,
            "budget": args.steps * args.samples_per_step,
            "eval_every_samples": args.eval_every * args.samples_per_step,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
            "beta": args.beta,
            "learning_rate": args.learning_rate,
        },
    }
    path = os.path.join(args.out_dir, "spec.json")
    with open(path, "w") as f:
        json.dump(spec, f, indent=1)
    return path


# ---- running --------------------------------------------------------------------------------------------------------
def run_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        ACCELERATE_USE_CPU="true",
        CUDA_VISIBLE_DEVICES="",
    )
    env.pop("PYTHONPATH", None)
    return env


def estimate_run_seconds(args, method: str) -> float:
    base = METHODS.get(method, {}).get("base", method)
    step = STEP_SECONDS.get(base, DEFAULT_STEP_SECONDS) * args.samples_per_step / 16 * args.max_new_tokens / 24
    evals = -(-args.steps // args.eval_every) + 1  # at 0, every eval_every steps and at the end
    return SETUP_SECONDS + args.steps * step + evals * args.eval_prompts * EVAL_SECONDS_PER_PROMPT


def schedule_seconds(durations: list[float], slots: int) -> float:
    """Makespan of running ``durations`` in order on ``slots`` workers (each job to the first free one)."""
    free = [0.0] * slots
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free)


def start_run(args, spec_path: str, method: str, seed: int):
    m = METHODS[method]
    name = f"{method}-s{seed}"
    runs_dir = os.path.join(args.out_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    dynamic = bool(m["config"].get("dynamic_sampling"))
    run = {
        "name": name,
        "method": method,
        "seed": seed,
        "config": m["config"],
        "minibatches": m.get("minibatches", 1),
        "trainer": m.get("trainer"),
        # the budget (in samples) ends a run; dynamic sampling draws more than a step's batch, so it gets more steps
        "max_steps": args.steps * (4 if dynamic else 1),
        "output_dir": os.path.join(runs_dir, name),
        "result": os.path.join(runs_dir, f"{name}.json"),
    }
    for stale in (run["result"],):
        if os.path.exists(stale):
            os.remove(stale)
    run_file = os.path.join(runs_dir, f"{name}.run.json")
    with open(run_file, "w") as f:
        json.dump(run, f, indent=1)
    python, script = (
        (args.python, "bench_learning_hfpg.py") if m["side"] == "hfpg" else (args.peers_python, "bench_learning_trl.py")
    )
    log = open(os.path.join(runs_dir, f"{name}.log"), "w")  # noqa: SIM115 - closed in finish_run
    proc = subprocess.Popen(
        [python, os.path.join(HERE, script), spec_path, run_file],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=run_env(args.threads),
        cwd=ROOT,
    )
    return {"name": name, "method": method, "seed": seed, "proc": proc, "log": log, "t0": time.perf_counter(), **run}


def finish_run(job: dict) -> dict:
    job["log"].close()
    wall = time.perf_counter() - job["t0"]
    rc = job["proc"].returncode
    result = {}
    if os.path.exists(job["result"]):
        with open(job["result"]) as f:
            result = json.load(f)
    out = {"name": job["name"], "method": job["method"], "seed": job["seed"], "wall_seconds": wall, "returncode": rc}
    out.update({k: v for k, v in result.items() if k not in out})
    if rc != 0 or not result.get("completed"):
        with open(job["log"].name) as f:
            out["error"] = f.read()[-3000:]
    return out


def run_all(args, spec_path: str) -> list[dict]:
    jobs = [(m, s) for s in args.seeds for m in args.methods]  # seed-major: every method shows up early
    est = {m: estimate_run_seconds(args, m) for m in args.methods}
    total_est = schedule_seconds([est[m] for m, _ in jobs], args.parallel)
    eta = time.strftime("%H:%M", time.localtime(time.time() + total_est))
    print(
        f"{len(jobs)} runs ({len(args.methods)} methods x {len(args.seeds)} seeds), {args.parallel} at a time, "
        f"{args.threads} thread(s) each; estimated {total_est / 60:.0f} min (ETA {eta})",
        flush=True,
    )
    t0 = time.perf_counter()
    pending, running, done, failed_methods = list(jobs), [], [], set()
    while pending or running:
        while pending and len(running) < args.parallel:
            method, seed = pending.pop(0)
            if method in failed_methods:
                done.append({"name": f"{method}-s{seed}", "method": method, "seed": seed, "skipped": True})
                print(f"  skip {method}-s{seed}: the method failed before its first evaluation", flush=True)
                continue
            job = start_run(args, spec_path, method, seed)
            print(f"  start {job['name']} (log: {job['log'].name})", flush=True)
            running.append(job)
        time.sleep(2)
        for job in [j for j in running if j["proc"].poll() is not None]:
            running.remove(job)
            r = finish_run(job)
            done.append(r)
            if "error" in r:
                if not r.get("evaluations"):
                    failed_methods.add(r["method"])
                last = r["error"].strip().splitlines()[-1:] or ["?"]
                print(f"  FAILED {r['name']} (exit {r['returncode']}, {r['wall_seconds']:.0f} s): {last[0][:200]}")
            else:
                e = r["evaluations"][-1]
                print(
                    f"  done {r['name']}: {r['wall_seconds']:.0f} s, {r['samples']} samples, held-out reward "
                    f"{e['reward']:+.3f}, KL {e['kl']:.2f}",
                    flush=True,
                )
            left = [est[m] for m, _ in pending if m not in failed_methods]
            remaining = schedule_seconds([*left, *[est[j["method"]] / 2 for j in running]], args.parallel)
            elapsed = time.perf_counter() - t0
            print(f"  {elapsed / 60:.1f} min elapsed, about {remaining / 60:.0f} min left", flush=True)
    return done


# ---- summary -------------------------------------------------------------------------------------------------------
def ok_runs(runs: list[dict], method: str) -> list[dict]:
    return [r for r in runs if r["method"] == method and "error" not in r and not r.get("skipped")]


def summarize(runs: list[dict]) -> dict:
    """Per method: the final evaluation's reward and KL (mean, min, max over seeds), times and samples; curves."""
    methods = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        ok = ok_runs(runs, method)
        failed = [r for r in runs if r["method"] == method and ("error" in r or r.get("skipped"))]
        entry = {"label": METHODS.get(method, {}).get("label", method), "runs": len(ok), "failed": len(failed)}
        if ok:
            finals = [r["evaluations"][-1] for r in ok]
            for key in ("reward", "kl", "kl_k3", "length"):
                vals = [f[key] for f in finals]
                entry[key] = {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals)}
            entry["components"] = {
                k: statistics.mean(f["components"][k] for f in finals) for k in finals[0]["components"]
            }
            entry["samples"] = [f["samples"] for f in finals]
            entry["wall_seconds"] = statistics.mean(r["wall_seconds"] for r in ok)
            entry["train_seconds"] = statistics.mean(r.get("train_seconds", 0.0) for r in ok)
            steps = [t for r in ok for t in r.get("step_seconds", [])]
            entry["step_seconds_median"] = statistics.median(steps) if steps else None
            n = min(len(r["evaluations"]) for r in ok)  # curves: evaluation i of every seed
            entry["curve"] = [
                {
                    "samples": statistics.mean(r["evaluations"][i]["samples"] for r in ok),
                    **{
                        f"{key}_{agg.__name__}": agg(r["evaluations"][i][key] for r in ok)
                        for key in ("reward", "kl")
                        for agg in (statistics.mean, min, max)
                    },
                }
                for i in range(n)
            ]
        else:
            entry["error"] = next((r.get("error", "skipped") for r in failed), "")[-600:]
        methods[method] = entry
    return methods


def check_target(methods: dict) -> dict:
    """Against TRL's best method (the highest final mean held-out reward): met when some hfpg rule ends with a reward
    at least as high at a KL no larger. The reward-best hfpg rule is reported beside it (it may buy reward with KL)."""

    def finished(side: str):
        return [(m, e) for m, e in methods.items() if m.startswith(side) and "reward" in e]

    hfpg, trl = finished("hfpg-"), finished("trl-")
    if not hfpg or not trl:
        return {"met": None, "detail": "not evaluated: needs at least one finished hfpg and one finished TRL method"}
    t = max(trl, key=lambda me: me[1]["reward"]["mean"])
    tr, tk = t[1]["reward"]["mean"], t[1]["kl"]["mean"]
    top = max(hfpg, key=lambda me: me[1]["reward"]["mean"])
    dominating = [(m, e) for m, e in hfpg if e["reward"]["mean"] >= tr and e["kl"]["mean"] <= tk]
    h = max(dominating, key=lambda me: me[1]["reward"]["mean"]) if dominating else top
    hr, hk = h[1]["reward"]["mean"], h[1]["kl"]["mean"]
    met = bool(dominating)
    detail = (
        f"{'met' if met else 'MISSED'}: hfpg {h[0]} reward {hr:+.3f} at KL {hk:.2f} vs TRL's best {t[0]} reward "
        f"{tr:+.3f} at KL {tk:.2f} (reward {hr - tr:+.3f}, KL {hk - tk:+.2f})"
    )
    if top[0] != h[0]:
        detail += f"; hfpg's highest reward: {top[0]} {top[1]['reward']['mean']:+.3f} at KL {top[1]['kl']['mean']:.2f}"
    # the frontier at TRL's KL: each hfpg rule's best evaluation (mean over seeds) whose KL is no larger
    within = {m: max((c["reward_mean"] for c in e["curve"] if c["kl_mean"] <= tk), default=None) for m, e in hfpg}
    best_within = max(((r, m) for m, r in within.items() if r is not None), default=None)
    if best_within:
        detail += f"; the best hfpg evaluation at KL <= {tk:.2f}: {best_within[1]} {best_within[0]:+.3f}"
    equal = sorted(set(h[1]["samples"])) == sorted(set(t[1]["samples"]))
    if not equal:
        detail += f"; samples differ: {h[1]['samples']} vs {t[1]['samples']}"
    return {
        "met": met,
        "hfpg": h[0],
        "trl": t[0],
        "detail": detail,
        "equal_samples": equal,
        "best_reward_within_trl_kl": within,
    }


def format_table(methods: dict) -> str:
    rows = [
        "| method | runs | held-out reward at half the budget | held-out reward at end (mean, min..max) | positivity "
        "| KL at end (nats/seq) | length | samples | wall per run (s) | step (s, median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in methods.values():
        if "reward" not in e:
            rows.append(f"| {e['label']} | 0 ({e['failed']} failed or unfinished) | - | - | - | - | - | - | - | - |")
            continue
        half = max(e["samples"]) / 2  # the evaluation nearest to half the budget (mean over seeds)
        mid = min(e["curve"], key=lambda c: abs(c["samples"] - half))
        r, k = e["reward"], e["kl"]
        pos = e["components"].get("positivity")
        failed = f" (+{e['failed']} failed or unfinished)" if e["failed"] else ""
        rows.append(
            f"| {e['label']} | {e['runs']}{failed} | {mid['reward_mean']:+.3f} at {mid['samples']:.0f} "
            f"| {r['mean']:+.3f} ({r['min']:+.3f}..{r['max']:+.3f}) | {'-' if pos is None else f'{pos:+.3f}'} "
            f"| {k['mean']:.2f} ({k['min']:.2f}..{k['max']:.2f}) | {e['length']['mean']:.1f} "
            f"| {'/'.join(str(s) for s in sorted(set(e['samples'])))} | {e['wall_seconds']:.0f} "
            f"| {e['step_seconds_median'] or 0:.1f} |"
        )
    return "\n".join(rows)


def plot(methods: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot")
        return None
    drawn = {m: e for m, e in methods.items() if e.get("curve")}
    # three panels: reward and KL against samples seen (seeds shaded min..max), and reward against KL (the trade the
    # target asks about: up and to the left is better); 14 distinct colours, the legend goes below
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2 + 0.25 * ((len(drawn) + 3) // 4)))
    colors = [*plt.get_cmap("tab10").colors, "black", "darkgoldenrod", "magenta", "lime"]
    for i, (method, e) in enumerate(drawn.items()):
        xs = [c["samples"] for c in e["curve"]]
        style = "-" if method.startswith("hfpg") else "--"
        color = colors[i % len(colors)]
        for ax, key in zip(axes, ("reward", "kl")):
            ax.plot(xs, [c[f"{key}_mean"] for c in e["curve"]], style, marker="o", ms=3, color=color, label=e["label"])
            ax.fill_between(
                xs,
                [c[f"{key}_min"] for c in e["curve"]],
                [c[f"{key}_max"] for c in e["curve"]],
                alpha=0.12,
                color=color,
            )
        kls, rewards = [c["kl_mean"] for c in e["curve"]], [c["reward_mean"] for c in e["curve"]]
        axes[2].plot(kls, rewards, style, marker="o", ms=3, color=color)
        axes[2].plot(kls[-1:], rewards[-1:], marker="*", ms=11, color=color)  # the end of the budget
    axes[0].set(xlabel="completions seen (training samples)", ylabel="held-out reward", title="held-out reward")
    axes[1].set(
        xlabel="completions seen (training samples)",
        ylabel="KL to reference (nats / completion)",
        title="held-out KL(policy || reference)",
    )
    axes[2].set(
        xlabel="KL to reference (nats / completion)",
        ylabel="held-out reward",
        title="reward against KL (mean over seeds; * = end)",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.03 * ((len(drawn) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.combine:
        return combine(args)
    needs_trl = any(METHODS[m]["side"] == "trl" for m in args.methods)
    if needs_trl and not os.path.exists(args.peers_python):
        sys.exit(f"bench_learning: {args.peers_python} not found (make .venv-peers/.installed creates it)")
    print("preparing the model, prompts and rewards ...", flush=True)
    spec_path = prepare(args)
    with open(spec_path) as f:
        spec = json.load(f)
    s = spec["settings"]
    print(
        f"budget {s['budget']} completions per run ({args.steps} steps x {args.samples_per_step}), evaluation every "
        f"{s['eval_every_samples']} samples on {len(spec['eval_prompts'])} held-out prompts, {args.max_new_tokens} new "
        f"tokens, lr {args.learning_rate:g}\nKL: {KL_NOTE}",
        flush=True,
    )
    runs = run_all(args, spec_path)
    methods = summarize(runs)
    target = check_target(methods)
    table = format_table(methods)
    print("\n" + table + "\n")
    for m, e in methods.items():
        if "error" in e:
            tail = [ln for ln in e["error"].strip().splitlines() if ln.strip()][-1:] or ["skipped"]
            print(f"  {m}: no finished run ({tail[0][:200]})")
    print(f"target (at equal samples, an hfpg rule's reward >= TRL's best at a KL no larger): {target['detail']}")
    png = plot(methods, args.plot) if args.plot != "none" else None
    total = time.perf_counter() - t0
    result = {
        "args": {k: v for k, v in vars(args).items()},
        "settings": s,
        "kl_mapping": KL_NOTE,
        "methods_config": {m: METHODS[m] for m in args.methods},
        "runs": runs,
        "summary": methods,
        "target": target,
        "total_seconds": total,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"JSON: {args.json}" + (f"\nplot: {png}" if png else ""))
    print(f"total wall time {total / 60:.1f} min")
    return 0


def load_results(path: str) -> dict:
    """A result JSON of this script, or an ``--out-dir`` folder whose runs finished (``runs/<method>-s<seed>.json``,
    written by each worker) even if this script did not: its settings come from the folder's ``spec.json``."""
    if not os.path.isdir(path):
        with open(path) as f:
            return json.load(f)
    with open(os.path.join(path, "spec.json")) as f:
        settings = json.load(f)["settings"]
    runs = []
    runs_dir = os.path.join(path, "runs")
    for name in sorted(os.listdir(runs_dir)):
        if not name.endswith(".json") or name.endswith(".run.json"):
            continue
        with open(os.path.join(runs_dir, name)) as f:
            result = json.load(f)
        run = {"name": result["run"], "method": result["method"], "seed": result["seed"], "returncode": 0}
        run["wall_seconds"] = result.get("process_seconds")
        run.update({k: v for k, v in result.items() if k not in run})
        if not result.get("completed"):
            run["error"] = f"unfinished: {result.get('samples', 0)} of {settings['budget']} samples"
        runs.append(run)
    return {"settings": settings, "runs": runs, "methods_config": {}, "total_seconds": 0.0}


def combine(args) -> int:
    """Summarise the runs of several result JSONs or run folders (same settings) as one."""
    results = [load_results(path) for path in args.combine]
    settings = results[0]["settings"]
    for path, r in zip(args.combine[1:], results[1:]):
        if r["settings"] != settings:
            sys.exit(f"bench_learning --combine: {path} was run with other settings than {args.combine[0]}")
    runs = [run for r in results for run in r["runs"]]
    methods = summarize(runs)
    target = check_target(methods)
    print(format_table(methods) + "\n")
    print(f"target (at equal samples, an hfpg rule's reward >= TRL's best at a KL no larger): {target['detail']}")
    png = plot(methods, args.plot) if args.plot != "none" else None
    configs = {}
    for r in results:
        configs.update(r.get("methods_config", {}))
    configs.update({m: METHODS[m] for m in {run["method"] for run in runs} if m in METHODS and m not in configs})
    result = {
        "combined_from": args.combine,
        "settings": settings,
        "kl_mapping": results[0].get("kl_mapping"),
        "methods_config": configs,
        "runs": runs,
        "summary": methods,
        "target": target,
        "total_seconds": sum(r.get("total_seconds", 0.0) for r in results),
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"JSON: {args.json}" + (f"\nplot: {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
