"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: one PPO step on CPU (gloo), then each rank
writes what it saw (its prompts, completions and the weights after the update) to OUT_DIR/rank{r}.json."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch
from conftest import make_tokenizer, tiny_gpt2

from hfpg import PGConfig, PGTrainer

out_dir = sys.argv[1]
tok = make_tokenizer()
# the same prompt on every row: ranks can only sample differently if their seeds differ
rows = [{"prompt": "the cat sat", "row": i} for i in range(8)]


def length(prompts, completions, **kw):
    return [len(c) / 10 for c in completions]


cfg = PGConfig(
    output_dir=os.path.join(out_dir, "run"),
    max_steps=1,
    rollout_batch_size=8,
    mini_batch_size=4,
    ppo_epochs=1,
    max_new_tokens=6,
    report_to=["tensorboard"],
    disable_tqdm=True,
    learning_rate=1e-2,
)
trainer = PGTrainer(tiny_gpt2(tok), tok, cfg, train_dataset=rows, reward_fn=length)
seen = {}
original = trainer.make_rollout


def spy(rows, **kw):
    rollout, timings = original(rows, **kw)
    seen.update(rows=rollout.columns["row"], completions=rollout.completions)
    return rollout, timings


trainer.make_rollout = spy
trainer.train()
acc = trainer.accelerator
weights = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])
with open(os.path.join(out_dir, f"rank{acc.process_index}.json"), "w") as f:
    json.dump(
        {
            "num_processes": acc.num_processes,
            "distributed_type": str(acc.distributed_type),
            "weights_sum": float(weights.double().sum()),
            "weights_head": weights[:50].tolist(),
            **seen,
        },
        f,
    )
# after train(): collectives still work (the process group survives the trackers being closed)
metrics = trainer.evaluate([{"prompt": "the cat sat", "row": i} for i in range(5)])
trainer.save_model(os.path.join(out_dir, "final"))
with open(os.path.join(out_dir, f"rank{acc.process_index}.eval.json"), "w") as f:
    json.dump(metrics, f)
