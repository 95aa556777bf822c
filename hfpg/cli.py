"""The ``hfpg`` command: ``train`` a recipe, ``eval`` a policy, ``push`` it to the Hub, list ``recipes``, inspect
``config`` keys."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile
import time

import yaml
from accelerate import PartialState
from huggingface_hub.errors import HFValidationError
from peft import PeftModel

from . import __version__
from .config import PGConfig
from .errors import CheckpointError, ConfigError, DataError, HubError, RewardError, TrainingError
from .hub import push_model_folder
from .modeling import AutoModelForCausalLMWithValueHead
from .recipe import load_models, load_prompts, load_recipe, load_tokenizer
from .reward_modeling import RMConfig, train_reward_model
from .runner import train_recipe
from .trainer import PGTrainer


def recipe_dirs() -> list[str]:
    """Where shipped recipe configs are looked up: ./recipes/configs, then the repository this hfpg came from."""
    here = os.path.dirname(os.path.abspath(__file__))
    dirs = [os.path.join("recipes", "configs"), os.path.join(os.path.dirname(here), "recipes", "configs")]
    return [
        d for i, d in enumerate(dirs) if os.path.isdir(d) and os.path.abspath(d) not in map(os.path.abspath, dirs[:i])
    ]


def _describe(path: str) -> str:
    """The first comment line of a recipe config."""
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                return line.lstrip("# ").strip()
    return ""


def _recipes(args) -> int:
    found = sorted({os.path.abspath(p) for d in recipe_dirs() for p in glob.glob(os.path.join(d, "*.yaml"))})
    if not found:
        print("no recipes found (run from a clone of the hfpg repository)", file=sys.stderr)
        return 1
    for path in found:
        print(f"{os.path.relpath(path):60s} {_describe(path)}")
    return 0


def _train(args) -> int:
    recipe_path, overrides, resume = args.recipe, list(args.overrides), args.resume
    if isinstance(resume, str) and not os.path.exists(resume):
        if "=" in resume:  # `--resume max_steps=8`: the flag, then an override
            overrides, resume = [*overrides, resume], True
        elif resume.endswith((".yaml", ".yml")) and "=" in recipe_path:  # `--resume recipe.yaml k=v`
            recipe_path, overrides, resume = resume, [recipe_path, *overrides], True
    if resume is not None:  # validated with the recipe (it cannot go with overwrite_output_dir)
        overrides.append(f"resume_from_checkpoint={'true' if resume is True else json.dumps(resume)}")
    recipe = load_recipe(recipe_path, overrides)
    paths = train_recipe(recipe)
    if not PartialState().is_main_process:  # under accelerate launch / torchrun: one summary, from rank 0
        return 0
    print("\nhfpg: run finished")
    for name, path in paths.items():
        print(f"  {name:8s} {path}")
    return 0


def _eval(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    # a trained adapter goes on the recipe's own base (a saved adapter names its base by Hub id or a relative path,
    # which may not resolve here, e.g. offline); a full model replaces the base
    adapter = bool(args.model) and os.path.isfile(os.path.join(args.model, "adapter_config.json"))
    if args.model:
        recipe.model.peft = None
        if not adapter:
            recipe.model.name_or_path, recipe.model.gguf_file = args.model, None
    cfg = recipe.training
    output = args.output or _eval_output(cfg.output_dir)
    tokenizer = load_tokenizer(recipe.model)
    train, evals = load_prompts(recipe.data, tokenizer, recipe.base_dir, cfg.seed, cfg.chat_template_kwargs)
    model, ref = load_models(recipe.model, with_reference=cfg.kl_coef > 0)
    if adapter:
        model = AutoModelForCausalLMWithValueHead.from_pretrained(
            PeftModel.from_pretrained(model.pretrained_model, args.model)
        )
    cfg.report_to = []
    # the trainer's own logs (metrics.jsonl) go to a scratch folder: never into a training run's metrics.jsonl
    with tempfile.TemporaryDirectory(prefix="hfpg-eval-") as scratch:
        cfg.output_dir = scratch
        trainer = PGTrainer(model, tokenizer, cfg, train_dataset=train, eval_dataset=evals, ref_model=ref)
        metrics = trainer.evaluate(evals if evals is not None else train)
    if not trainer.accelerator.is_main_process:
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics, indent=2))
    print(f"hfpg: wrote {output}", file=sys.stderr)
    return 0


def _eval_output(run_dir: str) -> str:
    """``RUN_DIR/eval-<date>-<time>.json``, a name no earlier evaluation used."""
    stem = os.path.join(run_dir, f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = f"{stem}.json", 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}.json"
    return path


def _push(args) -> int:
    url = push_model_folder(
        args.run_dir,
        args.repo_id,
        merge=args.merge,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
        revision=args.revision,
        create_pr=args.create_pr,
        dry_run=args.dry_run,
    )
    print(url if args.dry_run else f"hfpg: pushed to {url}")
    return 0


def _train_rm(args) -> int:
    config = RMConfig.from_yaml(args.config, args.overrides)
    result = train_reward_model(config)
    print("\nhfpg: reward model trained")
    for name, value in result["metrics"].items():
        if name.startswith("eval_") and not name.endswith(("runtime", "per_second")):
            print(f"  {name[5:]:12s} {value:.4f}")
    for name, path in result["paths"].items():
        print(f"  {name:12s} {path}")
    return 0


def _config(args) -> int:
    if args.file is None and not args.overrides:
        sys.stdout.write(PGConfig.documented_yaml())
        return 0
    config = PGConfig.from_yaml(args.file, args.overrides) if args.file else PGConfig.from_dict({}, args.overrides)
    config.check_for(args.num_processes)
    sys.stdout.write(config.to_yaml())
    print(
        f"# valid for {args.num_processes} process(es): {config.num_mini_batches} minibatches of "
        f"{config.mini_batch_size} per step",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfpg", description="Policy-gradient RL for Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"hfpg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="run a recipe (YAML) with key=value overrides",
        description="Train with a recipe: evaluate on held-out prompts, train, evaluate again, and "
        "write the run directory (config, metrics, TensorBoard, samples, final model, "
        "reward/KL plot, report.md). Overrides use dotted keys: model.name_or_path=..., "
        "data.max_train_samples=8, max_steps=10, rewards.0.weight=2. One run per output_dir: --resume continues "
        "an interrupted run from its checkpoints, overwrite_output_dir=true starts over.",
    )
    p.add_argument("recipe", help="a recipe YAML, e.g. recipes/configs/ppo_smollm2_sentiment.yaml")
    p.add_argument("overrides", nargs="*", help="key=value pairs (values parsed as YAML)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue the run in output_dir from its newest checkpoint (or CHECKPOINT, a checkpoint-N folder); "
        "give the recipe and overrides it was started with, before --resume: max_steps, logging, eval and save "
        "steps may change, batch sizes, seed, algorithm, model and data may not. Without --resume (or "
        "overwrite_output_dir=true) a used output_dir is an error",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "eval",
        help="score a policy on a recipe's held-out prompts with the recipe's rewards",
        description="Sample completions for the recipe's eval prompts (or its train prompts when it "
        "has none) and print mean reward, each reward part, KL and length as JSON, also written to "
        "OUTPUT_DIR/eval-<date>-<time>.json (or --output); a training run's metrics.jsonl is never written.",
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument(
        "--model",
        help="a trained policy folder (e.g. RUN_DIR/final): a full model, or an adapter put on the recipe's own base; "
        "default: the recipe's base model",
    )
    p.add_argument("--output", help="the JSON file to write (default: the recipe's output_dir/eval-<date>-<time>.json)")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "push",
        help="upload a trained model (adapter or full) with its model card to the Hugging Face Hub",
        description="Upload RUN_DIR/final (or a folder written by save_model) to the Hub model repo REPO_ID, created "
        "if needed: the policy or adapter, value_head.safetensors, tokenizer, hfpg_config.yaml and the "
        "model card. The token comes from HF_TOKEN or `hf auth login` (or --token) and is never printed. "
        "Nothing in RUN_DIR is written; a refused or failed push says why and how to fix it.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (with final/) or a saved model folder")
    p.add_argument("repo_id", metavar="REPO_ID", help="the Hub repo, e.g. your-name/smollm2-ppo-positive")
    p.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    p.add_argument("--revision", help="branch to push to (created if needed; default main)")
    p.add_argument("--commit-message", default=None, help="default: 'Upload model trained with hfpg'")
    p.add_argument("--merge", action="store_true", help="merge the adapter into its base and push the full model")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="contact nobody: list the files (and sizes) and the model card metadata a push would upload",
    )
    p.add_argument("--token", default=None, help="a Hub token (prefer HF_TOKEN: command lines end up in history)")
    p.set_defaults(func=_push)

    p = sub.add_parser(
        "train-rm",
        help="train a reward model (Bradley-Terry on preference pairs, or regression on ratings)",
        description="Train an AutoModelForSequenceClassification reward model from a YAML config (see "
        "reward_models/configs/): pairwise (prompt?/chosen/rejected[/margin] columns) or regression "
        "(prompt?/text/score). Reports held-out accuracy or correlation, stops early on it, and saves "
        "OUTPUT_DIR/final (model, tokenizer, reward_normalization.json, model card) for RewardModelReward.",
    )
    p.add_argument("config", help="a reward-model YAML, e.g. reward_models/configs/minilm_positivity.yaml")
    p.add_argument("overrides", nargs="*", help="key=value pairs (dotted for model./data. keys)")
    p.set_defaults(func=_train_rm)

    p = sub.add_parser("recipes", help="list the shipped recipes", description="List recipes/configs/*.yaml.")
    p.set_defaults(func=_recipes)

    p = sub.add_parser(
        "config",
        help="print the documented defaults, or validate a YAML config with key=value overrides",
        description="Without arguments: every config key with its default and one-line doc. With a file and/or "
        "key=value overrides: the resolved config, or one clear error listing every problem.",
    )
    p.add_argument("file", nargs="?", help="a YAML file of PGConfig keys")
    p.add_argument("overrides", nargs="*", help="key=value pairs applied after the file (values parsed as YAML)")
    p.add_argument("--num-processes", type=int, default=1, help="check that batch sizes divide over N processes")
    p.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # `hfpg config k=v` (no file): argparse puts the first override in `file`
    if getattr(args, "file", None) and "=" in args.file and not args.file.endswith((".yaml", ".yml")):
        args.overrides = [args.file, *args.overrides]
        args.file = None
    hints: dict[str, str] = {}
    try:
        hints = _override_hints(getattr(args, "overrides", None) or [])
        return args.func(args)
    except ConfigError as e:
        message = str(e)
        for key, hint in hints.items():  # a value YAML read as a mapping where a string was meant: say so
            if re.search(rf"(?<![\w.]){re.escape(key)}=", message):
                message = f"{message}; {hint}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError, RewardError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, HFValidationError) as e:  # a model or file that cannot be found or downloaded
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except TrainingError as e:  # the run itself failed (non-finite updates); its last checkpoint is intact
        print(f"error: {e}", file=sys.stderr)
        return 1


def _override_hints(overrides: list[str]) -> dict[str, str]:
    """Check that each ``key=value`` value is valid YAML (a :class:`ConfigError` naming the override otherwise) and
    return, by key, a hint for each value that YAML reads as a mapping or list although it is not written as one
    (``data.prompt_template=Q: {q}``): shown when that key's value is refused."""
    hints = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            continue  # reported by the loader: not of the form key=value
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({problem}); fix it (lists are [a, b], mappings "
                f"{{k: v}}), or quote it to pass it as a string: '{key}=\"{raw}\"'"
            ) from None
        if isinstance(value, (dict, list)) and raw.lstrip()[:1] not in ("{", "[", "-"):
            kind = "a mapping (`key: value`)" if isinstance(value, dict) else "a list"
            hints[key.strip()] = (
                f"YAML reads {raw!r} as {kind}: quote the value to pass it as a string, e.g. '{key}=\"{raw}\"'"
            )
    return hints


if __name__ == "__main__":
    sys.exit(main())
