"""A recipe run, step by step: what ``hfpg train`` and the scripts in ``recipes/`` do.

```python
run = RecipeRun(load_recipe("recipes/configs/ppo_gpt2_sentiment.yaml"))
run.evaluate("before"); run.trainer.train(); run.evaluate("after"); run.finish()
```
The run directory (``output_dir``) gets the resolved ``config.yaml``, ``metrics.jsonl``, TensorBoard events in
``runs/``, ``samples.jsonl``, ``eval.json`` (the held-out evaluations, with their samples), the trained model or
adapter in ``final/``, ``reward_kl.png`` and ``report.md``.

One run per directory (:mod:`hfpg.rundir`): a used ``output_dir`` is an error unless the recipe continues that run
(``resume_from_checkpoint: true`` or a checkpoint path, ``hfpg train --resume``; its config.yaml must agree on
what the checkpoint was built for, and its "before" evaluation is read back from eval.json) or clears it first
(``overwrite_output_dir: true``).
"""

from __future__ import annotations

import os

import yaml
from accelerate import PartialState
from transformers import set_seed

from . import rundir
from .distributed import accelerator_kwargs
from .hub import push_model_folder
from .recipe import Recipe, load_models, load_prompts, load_tokenizer
from .report import SampleLogger, plot_curves, sample_table, write_report
from .rewards.registry import build_reward
from .sources import dataset_id, is_hub_id
from .trainer import PGTrainer


class RecipeRun:
    """Loads everything a recipe names and builds the :class:`PGTrainer`; ``reward_fn`` overrides the recipe's
    ``rewards:`` (pass your own callable)."""

    def __init__(self, recipe: Recipe, reward_fn=None, callbacks=()):
        self.recipe = recipe
        cfg = recipe.training
        self.output_dir = cfg.output_dir
        state = PartialState(**accelerator_kwargs())  # this process's rank under a launcher; the Accelerator reuses it
        self.resume = self._check_output_dir(state.is_main_process)  # before anything is written or loaded
        if state.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
            identity = {**recipe.to_dict(), "resume_from_checkpoint": None, "overwrite_output_dir": False}
            rundir.write_atomic(os.path.join(self.output_dir, "config.yaml"), yaml.safe_dump(identity, sort_keys=False))
        if reward_fn is None:  # built (lazily: no model loads) before the policy, so a bad reward fails fast
            reward_fn = build_reward(
                cfg.rewards, cfg.reward_normalize, cfg.reward_clip, cfg.reward_nonfinite, base_dir=recipe.base_dir
            )
        else:
            cfg.rewards = []
        set_seed(cfg.seed)  # new weights (a LoRA adapter's init, a fresh value head) are reproducible too
        with state.main_process_first():  # caches (GGUF de-quantisation, datasets) are written once, by rank 0
            self.tokenizer = load_tokenizer(recipe.model)  # the data is checked against it before the model loads
            self.train_dataset, self.eval_dataset = load_prompts(
                recipe.data, self.tokenizer, recipe.base_dir, cfg.seed, cfg.chat_template_kwargs
            )
            model, ref_model = load_models(recipe.model, with_reference=cfg.kl_coef > 0)
        samples = SampleLogger(
            os.path.join(self.output_dir, "samples.jsonl"), recipe.report.samples_every, recipe.report.num_samples
        )
        self.trainer = PGTrainer(
            model,
            self.tokenizer,
            cfg,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            reward_fn=reward_fn,
            ref_model=ref_model,
            callbacks=[samples, *callbacks],
        )
        rundir.mark_started(self.trainer)  # checked above: its train() must not take the "before" metrics for a run
        self._describe_for_card()
        self.results: dict[str, dict] = {}
        self.samples: dict[str, list[dict]] = {}

    def _check_output_dir(self, main: bool) -> str | None:
        """The checkpoint this run continues (None for a new run): a used output_dir is refused unless the recipe
        resumes it (with a config its checkpoint can continue) or overwrites it (cleared here, by the main process)."""
        cfg = self.recipe.training
        if not cfg.resume_from_checkpoint:
            rundir.check_fresh_or_resume(self.output_dir, None, cfg.overwrite_output_dir, clear=main)
            return None
        checkpoint = rundir.resolve_checkpoint(self.output_dir, cfg.resume_from_checkpoint)
        rundir.check_resume(self.output_dir, self.recipe.to_dict(), checkpoint)
        step = rundir.checkpoint_step(checkpoint)
        if main and step is not None:  # before anything is logged again (train() checks once more, loaded)
            rundir.drop_logs_after(self.output_dir, step)
        if cfg.resume_from_checkpoint is not True:
            cfg.resume_from_checkpoint = checkpoint  # a folder name inside output_dir, made a path
        return checkpoint

    def _describe_for_card(self) -> None:
        """What the model card names as base model and datasets: Hub ids only, never local paths."""
        spec, data, card = self.recipe.model, self.recipe.data, self.trainer.model_card_data
        if spec.hub_base_model:
            card["base_model"] = spec.hub_base_model
        elif is_hub_id(spec.name_or_path) and not spec.gguf_file:
            card["base_model"] = spec.name_or_path
        if dataset_id(data.path):
            card["datasets"] = [data.path]

    def evaluate(self, tag: str) -> dict[str, float] | None:
        """Held-out metrics (and a few samples) under ``tag`` ("before" / "after"); None without eval prompts."""
        if self.eval_dataset is None or not self.recipe.report.before_after:
            return None
        saved = rundir.read_json(os.path.join(self.output_dir, "eval.json")) if self.resume and tag == "before" else {}
        if tag in saved and tag in saved.get("samples", {}):  # a resumed run's "before" was evaluated when it began
            self.results[tag], self.samples[tag] = saved[tag], saved["samples"][tag]
            return self.results[tag]
        self.results[tag] = self.trainer.evaluate()
        n = min(self.recipe.report.num_samples, len(self.eval_dataset))
        rows = [self.eval_dataset[i] for i in range(n)]
        self.samples[tag] = sample_table(self.trainer, rows)
        if tag == "before":  # kept for the report of a resumed run
            self._write_evaluations()
        return self.results[tag]

    def _write_evaluations(self) -> None:
        """eval.json: the evaluations so far by tag, and their samples under "samples" (main process)."""
        if self.trainer.accelerator.is_main_process:
            rundir.write_json(
                os.path.join(self.output_dir, "eval.json"), {**self.results, "samples": dict(self.samples)}
            )

    def finish(self) -> dict[str, str]:
        """Save the final model/adapter, the plot and the report; returns their paths."""
        out = self.output_dir
        paths = {
            "model": self.trainer.save_model(os.path.join(out, "final")),
            "metrics": os.path.join(out, "metrics.jsonl"),
        }
        if not self.trainer.accelerator.is_main_process:
            return paths
        if self.recipe.report.plot:
            plot = plot_curves(paths["metrics"], os.path.join(out, "reward_kl.png"))
            if plot:
                paths["plot"] = plot
        if "before" in self.results and "after" in self.results:
            title = f"hfpg {self.recipe.training.algorithm}: {os.path.basename(self.recipe.path or 'recipe')}"
            paths["report"] = write_report(
                os.path.join(out, "report.md"),
                title,
                self.results["before"],
                self.results["after"],
                self.samples["before"],
                self.samples["after"],
                paths.get("plot"),
            )
            self._write_evaluations()
        cfg = self.recipe.training
        if cfg.push_to_hub:  # last: a refused push leaves a complete run directory behind
            paths["hub"] = push_model_folder(
                paths["model"],
                cfg.hub_model_id,
                private=cfg.hub_private_repo,
                revision=cfg.hub_revision,
                commit_message=f"hfpg {cfg.algorithm}: {os.path.basename(out)}",
            )
        return paths


def train_recipe(recipe: Recipe, reward_fn=None) -> dict[str, str]:
    """Everything ``hfpg train`` does: evaluate, train, evaluate again, write the run directory; with
    ``resume_from_checkpoint``, continue the run in ``output_dir`` from that checkpoint."""
    run = RecipeRun(recipe, reward_fn=reward_fn)
    run.evaluate("before")
    run.trainer.train(resume_from_checkpoint=run.resume)
    run.evaluate("after")
    return run.finish()
