"""GPT-2 continues IMDB reviews positively: PPO with a value head against a learned sentiment classifier.

Needs Hub access for openai-community/gpt2, stanfordnlp/imdb and lvwerra/distilbert-imdb.

    python recipes/ppo_gpt2_sentiment.py --config recipes/configs/ppo_gpt2_sentiment.yaml [key=value ...]

The same config runs with `hfpg train recipes/configs/ppo_gpt2_sentiment.yaml`. Copy this file to change any step.
"""

import argparse

from hfpg.recipe import load_recipe
from hfpg.runner import RecipeRun

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="recipes/configs/ppo_gpt2_sentiment.yaml")
parser.add_argument("overrides", nargs="*", help="key=value, dotted for sections: model.name_or_path=..., max_steps=5")
args = parser.parse_args()

recipe = load_recipe(args.config, args.overrides)  # YAML + overrides, validated before anything loads
run = RecipeRun(recipe)  # tokenizer, policy + value head (+ LoRA), prompts, trainer
run.evaluate("before")  # held-out reward of the untrained policy
run.trainer.train()  # rollout -> rewards -> KL-shaped advantages -> PPO update, per step
run.evaluate("after")
for name, path in run.finish().items():  # final/ model or adapter, reward_kl.png, report.md
    print(f"{name:8s} {path}")
