#!/usr/bin/env python
"""Train a reward model from a YAML config — what `hfpg train-rm CONFIG.yaml key=value ...` runs.

    python reward_models/train_rm.py reward_models/configs/minilm_positivity.yaml num_train_epochs=2

Step by step: load and validate the preference (or rating) data, tokenise it the way `RewardModelReward` will score
PPO samples, train with `transformers.Trainer` (Bradley-Terry or MSE loss, early stopping on held-out accuracy or
correlation), then save the best model with its tokenizer, normalisation statistics and a model card.
"""

from __future__ import annotations

import json
import sys

from hfpg.reward_modeling import RMConfig, train_reward_model


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    config = RMConfig.from_yaml(argv[0], argv[1:])
    result = train_reward_model(config)
    print(json.dumps({"metrics": result["metrics"], "paths": result["paths"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
