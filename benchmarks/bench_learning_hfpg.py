"""bench_learning.py's hfpg worker: one training run (method, seed) in this process, the project venv.

    bench_learning_hfpg.py SPEC.json RUN.json

SPEC (written by bench_learning.py): the shared settings (model folder, prompts, rewards, budget). RUN: the method's
config overrides, the seed and where to write the result. The demo recipe is loaded, its data, model and rewards
replaced by the prepared ones, the method's overrides applied, and ``PGTrainer.train()`` runs with the shared
held-out callback.
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def build_recipe_dict(spec: dict, run: dict) -> dict:
    """The demo recipe with the benchmark's data, model, rewards, budget and the method's overrides."""
    import yaml

    with open(spec["recipe"]) as f:
        raw = yaml.safe_load(f)
    s = spec["settings"]
    raw["model"] = {"name_or_path": spec["model_dir"], "peft": spec["peft"]}
    raw["data"] = {"path": "json", "data_files": spec["train_file"], "prompt_column": "prompt", "chat_template": False}
    raw["report"] = {"samples_every": 0, "before_after": False, "plot": False}
    raw["rewards"] = spec["rewards"]
    k = int(run["config"].get("num_samples_per_prompt", 1))
    batch = s["samples_per_step"]
    if batch % k:
        raise SystemExit(f"--samples-per-step {batch} is not a multiple of num_samples_per_prompt={k}")
    raw.update(
        output_dir=run["output_dir"],
        overwrite_output_dir=True,
        report_to=[],
        disable_tqdm=True,
        logging_steps=1,
        eval_steps=0,
        save_steps=0,
        seed=run["seed"],
        max_steps=run["max_steps"],
        rollout_batch_size=batch,
        mini_batch_size=max(batch // int(run.get("minibatches", 1)), 1),
        max_new_tokens=s["max_new_tokens"],
        temperature=s["temperature"],
        learning_rate=s["learning_rate"],
        kl_coef=s["beta"],
    )
    raw.update(run["config"])
    return raw


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, run_path = argv
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from bench_learning_eval import WorkerRun

    import hfpg
    from hfpg.recipe import recipe_from_dict
    from hfpg.rewards.combined import CombinedReward
    from hfpg.runner import RecipeRun

    w = WorkerRun(spec_path, run_path, "hfpg", {"hfpg": getattr(hfpg, "__version__", "?")}, t0=t0)
    raw = build_recipe_dict(w.spec, w.run)
    recipe = recipe_from_dict(raw, w.spec["recipe"])
    reward = CombinedReward([(fn, weight) for _, weight, fn in w.parts])
    score = reward.score

    def counted_score(inputs):  # every completion generated for training is scored once
        w.counter.add(len(inputs.completions))
        return score(inputs)

    reward.score = counted_score
    callback = w.callback(config=raw_config(raw))
    rr = RecipeRun(recipe, reward_fn=reward, callbacks=[callback])
    callback.write(setup_seconds=w.seconds())
    rr.trainer.train()
    callback.write(process_seconds=w.seconds(), completed=True)
    return 0


def raw_config(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if k not in ("model", "data", "report", "rewards")}


if __name__ == "__main__":
    sys.exit(main())
