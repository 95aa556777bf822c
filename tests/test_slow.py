"""Slow end-to-end checks (`make test-slow`): the benchmark scripts, and LoRA PPO learning on a Llama-architecture
model. Each takes tens of seconds on 2 CPU cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig
from test_trainer import make_trainer, set_share

from hfpg import AutoModelForCausalLMWithValueHead

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, out: Path, *args: str) -> tuple[str, dict]:
    """Run ``benchmarks/<script>`` on the CPU with ``--json out``; (stdout, the JSON it wrote)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--device", "cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_benchmark_script_times_every_phase(tmp_path):
    stdout, result = run_benchmark(
        "bench_phases.py", tmp_path / "bench.json", "--batch-size", "8", "--max-new-tokens", "8", "--steps", "2"
    )
    assert "generate" in stdout and "tokens/s" in stdout
    text = json.dumps(result)
    for phase in (
        "time/generate",
        "time/policy_forward",
        "time/ref_forward",
        "time/reward",
        "time/update",
        "time/step",
    ):
        assert phase in text, phase


@pytest.mark.slow
def test_peft_memory_benchmark_compares_full_and_lora_side_by_side(tmp_path):
    stdout, result = run_benchmark(
        "bench_peft_memory.py", tmp_path / "mem.json", "--model", "tiny-gpt2", "--repeats", "1", "--steps", "1"
    )
    rows = result["rows"]
    assert rows["separate reference parameters"]["lora"] == 0 < rows["separate reference parameters"]["full"]
    assert 0 < rows["trainable parameters"]["lora"] < rows["trainable parameters"]["full"]
    assert rows["peak memory (MiB)"]["full"] > 0 and rows["peak memory (MiB)"]["lora"] > 0
    assert "LoRA / full" in stdout


@pytest.mark.slow
def test_lora_ppo_on_a_llama_architecture_learns(tokenizer, tmp_path):
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    # a wider init than the default 0.02: with frozen embeddings and norms, a default tiny random model cannot make
    # its (near-uniform) next-token distribution peaked through low-rank updates alone
    base = tiny_llama(tokenizer, initializer_range=0.2)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        model=model,
        max_steps=40,
        rollout_batch_size=32,
        mini_batch_size=16,
        ppo_epochs=4,
        max_new_tokens=8,
        learning_rate=3e-2,
        reward=set_share(tokenizer),
    )
    trainer.train()
    scores = [r["objective/scores"] for r in trainer.log_history]
    start, end = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert start < 0.1 and end > start + 0.2, scores
    after = dict(trainer.unwrapped_model.named_parameters())
    assert frozen and all(torch.equal(after[n], p) for n, p in frozen.items())  # the base never moved
