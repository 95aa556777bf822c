"""Run by tests/test_vllm.py under `torchrun --nproc_per_node 2` (in .venv-vllm): each rank owns a colocated vLLM
engine and samples its own shard; two PPO steps, then each rank writes what it saw to OUT_DIR/rank{r}.json."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch
from conftest import make_tokenizer, tiny_gpt2

from hfpg import PGConfig, PGTrainer, TrainerCallback

out_dir = sys.argv[1]
tok = make_tokenizer()
rows = [{"prompt": "the cat sat", "row": i} for i in range(8)]  # one prompt: ranks differ only by their seeds


def length(prompts, completions, **kw):
    return [len(c) / 10 for c in completions]


class Keep(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, trainer, step, metrics):
        r = trainer.last_rollout
        self.steps.append(
            {
                "completions": r.response_ids.tolist(),
                "gap": metrics["vllm/logprob_abs_diff"],
                "is_weight": metrics["vllm/is_weight"],
                "scores": metrics["objective/scores"],
                "sync": metrics["time/weight_sync"],
            }
        )


cfg = PGConfig(
    output_dir=os.path.join(out_dir, "run"),
    max_steps=2,
    rollout_batch_size=8,
    mini_batch_size=4,
    ppo_epochs=1,
    max_new_tokens=6,
    report_to=[],
    disable_tqdm=True,
    learning_rate=1e-2,
    generation_backend="vllm",
)
keep = Keep()
trainer = PGTrainer(tiny_gpt2(tok, n_embd=64, n_head=2), tok, cfg, train_dataset=rows, reward_fn=length)
trainer.callbacks.append(keep)
trainer.train()
acc = trainer.accelerator
weights = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])
with open(os.path.join(out_dir, f"rank{acc.process_index}.json"), "w") as f:
    json.dump(
        {"num_processes": acc.num_processes, "weights_sum": float(weights.double().sum()), "steps": keep.steps}, f
    )
