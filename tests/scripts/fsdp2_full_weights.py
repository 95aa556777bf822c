"""Run by tests/test_distributed_backends.py under `torchrun --nproc_per_node 2` (gloo, CPU): a policy sharded with
torch's FSDP2 (`fully_shard`, what recipes/accelerate/fsdp.yaml sets up through Accelerate on GPUs) is gathered by
hfpg.distributed.full_weights for sampling, samples exactly like the unsharded policy, and is re-sharded afterwards."""

import json
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from conftest import make_tokenizer, tiny_gpt2
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hfpg import AutoModelForCausalLMWithValueHead
from hfpg.distributed import full_weights, sharding

dist.init_process_group("gloo")
rank = dist.get_rank()
tok = make_tokenizer()
reference = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(tok, seed=5)).eval()
policy = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(tok, seed=5)).eval()
for block in policy.pretrained_model.transformer.h:  # one unit per decoder layer, then the root
    fully_shard(block)
fully_shard(policy)
plugin = SimpleNamespace(fsdp_version=2, reshard_after_forward=True)
fake_acc = SimpleNamespace(
    distributed_type=DistributedType.FSDP, unwrap_model=lambda m: m, state=SimpleNamespace(fsdp_plugin=plugin)
)
enc = tok(["the cat sat", "hello"], return_tensors="pt", padding=True, padding_side="left")
kw = dict(max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
expected = reference.generate(**enc, **kw)
sharded_before = all(isinstance(p, DTensor) for p in policy.parameters())
with full_weights(policy, fake_acc) as full:
    gathered = not any(isinstance(p, DTensor) for p in full.parameters())
    full_shapes = all(p.shape == q.shape for p, q in zip(full.parameters(), reference.parameters()))
    torch.manual_seed(0)
    got = full.generate(**enc, **kw)
    still_full = not any(isinstance(p, DTensor) for p in full.parameters())  # forwards did not re-shard
sharded_after = all(isinstance(p, DTensor) for p in policy.parameters())
with open(os.path.join(sys.argv[1], f"fsdp2.rank{rank}.json"), "w") as f:
    json.dump(
        {
            "kind": sharding(fake_acc),
            "sharded_before": sharded_before,
            "gathered": gathered,
            "full_shapes": full_shapes,
            "still_full_after_generate": still_full,
            "sharded_after": sharded_after,
            "same_samples": torch.equal(expected, got),
            "samples": got.tolist(),
        },
        f,
    )
dist.destroy_process_group()
