"""Run by tests/test_distributed_backends.py under `torchrun --nproc_per_node 2` when deepspeed is installed (CPU,
gloo): a ZeRO-3 engine's partitioned policy is gathered by hfpg.distributed.full_weights for sampling (DeepSpeed's
own unwrap_model_for_generation), samples exactly like the unsharded policy, and is partitioned again afterwards."""

import json
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import deepspeed
import torch
from accelerate.utils import DistributedType
from conftest import make_tokenizer, tiny_gpt2

from hfpg import AutoModelForCausalLMWithValueHead
from hfpg.distributed import full_weights, sharding

deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
tok = make_tokenizer()
reference = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(tok, seed=5)).eval()
policy = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(tok, seed=5))
ds_config = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
    "zero_allow_untested_optimizer": True,
}
engine, *_ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(), config=ds_config)
engine.eval()
fake_acc = SimpleNamespace(
    distributed_type=DistributedType.DEEPSPEED,
    unwrap_model=lambda e: e.module,
    state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)),
)
enc = tok(["the cat sat", "hello"], return_tensors="pt", padding=True, padding_side="left")
kw = dict(max_new_tokens=32, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
expected = reference.generate(**enc, **kw)
partitioned_before = all(p.numel() == 0 for p in engine.module.parameters())
t0 = time.perf_counter()
torch.manual_seed(0)
layer_by_layer = engine.module.generate(**enc, **kw)  # without gathering: every layer is fetched for every token
t_layer_by_layer = time.perf_counter() - t0
t0 = time.perf_counter()
with full_weights(engine, fake_acc) as full:
    gathered = all(p.shape == q.shape for p, q in zip(full.parameters(), reference.parameters()))
    torch.manual_seed(0)
    got = full.generate(**enc, **kw)
t_gathered = time.perf_counter() - t0
partitioned_after = all(p.numel() == 0 for p in engine.module.parameters())
with open(os.path.join(sys.argv[1], f"zero3.rank{rank}.json"), "w") as f:
    json.dump(
        {
            "kind": sharding(fake_acc),
            "partitioned_before": partitioned_before,
            "gathered": gathered,
            "partitioned_after": partitioned_after,
            "same_samples": torch.equal(expected, got),
            "same_samples_layer_by_layer": torch.equal(expected, layer_by_layer),
            "generate_s": {"layer_by_layer": t_layer_by_layer, "gathered_once": t_gathered},
        },
        f,
    )
