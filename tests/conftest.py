"""Offline fixtures: a byte-level BPE tokenizer trained in a fraction of a second, and tiny random causal LMs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "a good day is a day with good food and good friends",
    "reinforcement learning fine tunes language models with rewards",
    "policy gradient methods push up the probability of good actions",
    "hello world, this is a tiny corpus for a tiny tokenizer",
] * 4


# sixteen words for small prompt files (recipes, run directories, fault injection)
WORDS = "the cat sat on the mat and a good day with good food for the dog".split()  # noqa: SIM905


def make_tokenizer(pad_is_eos: bool = False) -> PreTrainedTokenizerFast:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS, vocab_size=320, min_frequency=1, show_progress=False, special_tokens=["<|endoftext|>", "<pad>"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tok.pad_token = tok.eos_token if pad_is_eos else "<pad>"
    return tok


@pytest.fixture(scope="session")
def tokenizer_base():
    return make_tokenizer()


@pytest.fixture
def tokenizer(tokenizer_base):
    import copy

    return copy.deepcopy(tokenizer_base)


@pytest.fixture
def tokenizer_pad_is_eos():
    return make_tokenizer(pad_is_eos=True)


def tiny_gpt2(tokenizer, seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def small_run(tmp_path, **overrides) -> dict:
    """PGConfig keys of a seconds-long run on a tiny model: 4 sequences a step, one pass, 2 steps, no trackers."""
    cfg = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        rollout_batch_size=4,
        mini_batch_size=4,
        ppo_epochs=1,
        learning_rate=1e-2,
        max_new_tokens=4,
        report_to=[],
        disable_tqdm=True,
    )
    cfg.update(overrides)
    return cfg


def tiny_recipe(root, max_steps: int, save_steps: int):
    """A recipe file in ``root`` on a tiny local GPT-2, 16 local prompts (4 held out) and a length reward from a
    ``rewards.py`` next to it (relative, as users write it): the run-directory and fault-injection tests' run."""
    import json

    tok = make_tokenizer()
    tiny_gpt2(tok).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": " ".join(WORDS[i % 7 : i % 7 + 4])}) + "\n")
    (root / "rewards.py").write_text(
        "def length(completions, **kwargs):\n    return [len(c) / 10 for c in completions]\n"
    )
    path = root / "recipe.yaml"
    path.write_text(
        f"model: {{name_or_path: {root / 'gpt2'}}}\n"
        f"data: {{path: json, data_files: {root / 'prompts.jsonl'}, eval_size: 4}}\n"
        "report: {samples_every: 1, num_samples: 2}\n"
        "rewards: [{name: rewards.py:length}]\n"
        f"max_steps: {max_steps}\nsave_steps: {save_steps}\nrollout_batch_size: 4\nmini_batch_size: 2\nppo_epochs: 2\n"
        "max_new_tokens: 6\nlearning_rate: 0.01\nkl_coef: 0.05\nreport_to: []\ndisable_tqdm: true\n"
    )
    return path


def tiny_llama(tokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture
def gpt2(tokenizer):
    return tiny_gpt2(tokenizer)


@pytest.fixture
def llama(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test gets its own Accelerator state (trainers in one process otherwise share it)."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def torchrun(*args: str, env: dict, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (through ``python -m torch.distributed.run``, so it uses this
    interpreter); a failed run fails the test with the end of its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
