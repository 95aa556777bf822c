"""What a recipe run leaves behind besides metrics: samples.jsonl, a reward/KL plot and a before/after report."""

from __future__ import annotations

import json
import math
import os

import torch

from .callbacks import TrainerCallback


class SampleLogger(TrainerCallback):
    """Every ``every`` steps, append ``num`` (prompt, completion, score, each reward part) rows to samples.jsonl."""

    def __init__(self, path: str, every: int = 10, num: int = 4):
        self.path, self.every, self.num = path, every, num

    def on_step_end(self, trainer, step, metrics):
        if not self.every or step % self.every or not trainer.accelerator.is_main_process:
            return
        r = trainer.last_rollout
        with open(self.path, "a") as f:
            for row in sample_rows(r, min(self.num, r.batch_size)):
                f.write(json.dumps({"step": step, **row}, ensure_ascii=False, default=str) + "\n")


def sample_rows(r, n: int) -> list[dict]:
    """The first ``n`` samples of a rollout as rows: the prompt as a person reads it (a recipe's ``prompt_text``, else
    the text the policy saw, chat template included), the completion, the score (None when no reward applied), each
    reward part (None where it did not apply) and the columns rewards logged with ``log_extra``."""
    shown = r.columns.get("prompt_text", r.prompts)
    rows = []
    for i in range(n):
        scorable = r.scorable is None or bool(r.scorable[i])
        row = {
            "prompt": shown[i],
            "completion": r.completions[i],
            "score": float(r.scores[i]) if scorable else None,
            **{k: None if math.isnan(float(v[i])) else float(v[i]) for k, v in r.components.items()},
        }
        for column, values in r.extras.items():
            row.setdefault(column, values[i] if i < len(values) else None)
        rows.append(row)
    return rows


@torch.no_grad()
def sample_table(trainer, rows: list[dict]) -> list[dict]:
    """Completions and scores (with reward parts) for ``rows`` from the trainer's current policy."""
    r, _ = trainer.make_rollout(rows)
    return sample_rows(r, r.batch_size)


def plot_curves(metrics_path: str, png_path: str) -> str | None:
    """Reward (and each reward part) and KL against step, from metrics.jsonl, as a PNG. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "objective/scores" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r["objective/scores"] for r in rows], label="reward (total)", linewidth=2)
    for key in sorted(k for k in rows[-1] if k.startswith("reward/") and k.endswith("/mean")):
        ax1.plot(steps, [r.get(key, float("nan")) for r in rows], label=key[7:-5], alpha=0.7)
    ax1.set_xlabel("step")
    ax1.set_title("reward")
    ax1.legend(fontsize=8)
    ax2.plot(steps, [r.get("objective/kl", float("nan")) for r in rows], color="tab:red")
    ax2.set_xlabel("step")
    ax2.set_title("KL(policy ‖ reference), nats per sequence")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def _score(score: float | None) -> str:
    return "—" if score is None else f"{score:.3f}"


def _cell(text: str, width: int = 160) -> str:
    text = str(text).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def write_report(
    path: str,
    title: str,
    before: dict,
    after: dict,
    samples_before: list[dict],
    samples_after: list[dict],
    plot: str | None,
) -> str:
    """report.md: eval metrics before and after training, and a side-by-side table of samples with their scores."""
    lines = [f"# {title}", "", "## Held-out evaluation", "", "| metric | before | after |", "|---|---|---|"]
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key, float("nan")), after.get(key, float("nan"))
        lines.append(f"| {key} | {b:.4g} | {a:.4g} |")
    if plot:
        lines += ["", f"![reward and KL]({os.path.basename(plot)})"]
    lines += ["", "## Samples", "", "| prompt | before | score | after | score |", "|---|---|---|---|---|"]
    for b, a in zip(samples_before, samples_after):
        lines.append(
            f"| {_cell(b['prompt'], 80)} | {_cell(b['completion'])} | {_score(b['score'])} | "
            f"{_cell(a['completion'])} | {_score(a['score'])} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
