"""RLHF end to end, offline: PPO + LoRA on SmolLM2-135M-Instruct against a learned reward model.

The reward model is all-MiniLM-L6-v2 fine-tuned on preference pairs (`make rm-demo` trains it first with
`hfpg train-rm reward_models/configs/minilm_positivity.yaml`); VADER, the "human" that labelled those pairs, is logged
with weight 0 as the gold reward the learned one stands in for. Fluency (LM likelihood) and the KL penalty to the
reference (the LoRA base with its adapter off) keep the text natural.

    python recipes/ppo_smollm2_reward_model.py --config recipes/configs/ppo_smollm2_reward_model.yaml [key=value ...]

The same config runs with `hfpg train recipes/configs/ppo_smollm2_reward_model.yaml`. Copy this file to change any step.
"""

import argparse

from hfpg.recipe import load_recipe
from hfpg.runner import RecipeRun

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="recipes/configs/ppo_smollm2_reward_model.yaml")
parser.add_argument("overrides", nargs="*", help="key=value, dotted for sections: model.name_or_path=..., max_steps=5")
args = parser.parse_args()

recipe = load_recipe(args.config, args.overrides)  # YAML + overrides, validated before anything loads
run = RecipeRun(recipe)  # tokenizer, policy + value head (+ LoRA), prompts, trainer
run.evaluate("before")  # held-out reward of the untrained policy
run.trainer.train()  # rollout -> rewards -> KL-shaped advantages -> PPO update, per step
run.evaluate("after")
for name, path in run.finish().items():  # final/ model or adapter, reward_kl.png, report.md
    print(f"{name:8s} {path}")
