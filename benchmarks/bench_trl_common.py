"""What the bench_trl.py workers share: the reward, the step clock, memory readings and the result file.

Standard library only: both the hfpg worker (project venv) and the TRL workers (.venv-peers, no hfpg installed)
import it, so the reward and the way a step is timed are literally the same code on both sides.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import time

TARGET_CHAR = "e"  # the same reward as bench_phases.py
# Parts of a step each worker times (both sides define them the same way); "rest" is the step time minus these:
# the loss forward and backward, the optimizer step and the trainer's bookkeeping.
PHASES = ("generate", "policy_forward", "ref_forward", "reward")


def char_fraction_reward(prompts, completions, **kwargs) -> list[float]:
    """Fraction of the completion's characters that are TARGET_CHAR: cheap, deterministic, in [0, 1]."""
    return [c.count(TARGET_CHAR) / len(c) if c else 0.0 for c in completions]


def default_threads() -> int:
    """Cores this process may run on (the torch / OpenMP thread count every worker uses by default)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def peak_rss_mib() -> float:
    """Process-wide peak resident set size since start (getrusage ru_maxrss), in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if platform.system() == "Darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def current_rss_mib() -> float:
    """Resident set size now (VmRSS from /proc on Linux; the peak where /proc is missing), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return peak_rss_mib()


class StepClock:
    """Wall-clock timestamps at the start of training and at the end of every optimizer step.

    A step's time is the difference between consecutive timestamps, so it covers everything the trainer does between
    two ``on_step_end`` callbacks: sampling prompts, generation, the no-grad forwards, the reward, the loss forward
    and backward, the optimizer step and the trainer's own bookkeeping. The first ``warmup`` steps are dropped.
    """

    def __init__(self) -> None:
        self.t_begin: float | None = None
        self.stamps: list[float] = []
        self.cpu_begin: float | None = None
        self.cpu_stamps: list[float] = []  # process CPU time (all threads, user + system)
        self.tokens: list[int] = []  # prompt + completion tokens of each step
        self.completion_lengths: list[float] = []  # mean completion length of each step
        self.phases: list[dict[str, float]] = []  # seconds spent in each of PHASES, per step

    def begin(self) -> None:
        self.t_begin = time.perf_counter()
        self.cpu_begin = time.process_time()

    def end_step(self, tokens: int, mean_completion_length: float, phases: dict[str, float] | None = None) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        self.tokens.append(int(tokens))
        self.completion_lengths.append(float(mean_completion_length))
        self.phases.append({k: float((phases or {}).get(k, 0.0)) for k in PHASES})

    def step_times(self) -> list[float]:
        edges = [self.t_begin, *self.stamps]
        return [b - a for a, b in itertools.pairwise(edges)]

    def cpu_times(self) -> list[float]:
        edges = [self.cpu_begin, *self.cpu_stamps]
        return [b - a for a, b in itertools.pairwise(edges)]


def write_result(
    path: str,
    worker: str,
    clock: StepClock,
    warmup: int,
    settings: dict,
    versions: dict,
    setup: dict,
    extra: dict | None = None,
) -> dict:
    """The worker's JSON: measured step times (after ``warmup``), tokens per step, lengths, memory, versions."""
    times = clock.step_times()
    if len(times) <= warmup:
        raise RuntimeError(f"{worker}: only {len(times)} steps ran, need more than warmup={warmup}")
    measured = times[warmup:]
    phases = {k: [p[k] for p in clock.phases[warmup:]] for k in PHASES}
    phases["rest"] = [t - sum(p[k] for k in PHASES) for t, p in zip(measured, clock.phases[warmup:])]
    result = {
        "worker": worker,
        "versions": versions,
        "settings": settings,
        "warmup": warmup,
        "step_seconds": measured,
        "cpu_seconds": clock.cpu_times()[warmup:],
        "phase_seconds": phases,
        "warmup_step_seconds": times[:warmup],
        "tokens_per_step": clock.tokens[warmup:],
        "completion_length_mean": sum(clock.completion_lengths[warmup:]) / len(clock.completion_lengths[warmup:]),
        "completion_length_per_step": clock.completion_lengths[warmup:],
        "setup_seconds": setup["seconds"],
        "setup_rss_mib": setup["rss_mib"],
        "peak_rss_mib": peak_rss_mib(),
        "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }
    result.update(extra or {})
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def load_prompts(path: str) -> list[str]:
    with open(path) as f:
        return json.load(f)["prompts"]


def worker_args(description: str, argv=None):
    """The command line every worker takes (bench_trl.py passes the same values to each)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model-dir", required=True, help="a save_pretrained folder: model weights and tokenizer")
    p.add_argument("--prompts-file", required=True, help='JSON {"prompts": [...]}')
    p.add_argument("--prompts", type=int, default=8, help="distinct prompts per step")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="completions per prompt (k)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="completion length (min = max)")
    p.add_argument("--steps", type=int, default=6, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient (hfpg kl_coef, TRL beta)")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=default_threads(), help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, help="where to write the result")
    args = p.parse_args(argv)
    args.batch = args.prompts * args.samples_per_prompt
    return args


def settings_of(args) -> dict:
    return {
        k: getattr(args, k)
        for k in (
            "prompts",
            "samples_per_prompt",
            "batch",
            "max_new_tokens",
            "steps",
            "warmup",
            "beta",
            "learning_rate",
            "threads",
            "seed",
        )
    }
