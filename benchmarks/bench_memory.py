#!/usr/bin/env python
"""Peak memory of one RL training step on long completions: hfpg without and with ``logits_chunk_size``, and TRL.

The step is the update on a fixed batch (no generation): 16 sequences of a ~32-token left-padded prompt and 512
completion tokens on a 49k-vocabulary model with SmolLM2-135M's architecture (random weights, saved once so that
every worker loads the same ones). Each measurement is a fresh process, so its peak RSS (``ru_maxrss``) is its own:

- hfpg, PPO (value head, GAE), ``ppo_epochs=1`` and one minibatch, as ``PGTrainer.step`` runs it after generation:
  the fused training forward (logprobs, values, entropy without graph), advantages, the loss, backward, AdamW step;
  once with ``logits_chunk_size=null`` (the full (B, T, V) logits) and once with chunks;
- TRL 1.16 ``RLOOTrainer`` (in ``--peers-python``, which need not have hfpg): its ``compute_loss`` (the same call
  ``Trainer.training_step`` makes: the fused LM head over completion positions, entropy for logging), the backward and
  the AdamW step. Its no-grad old-log-prob forward runs first and is not timed (hfpg's fused step needs none).

Neither side loads a reference model (``kl_coef=0`` / ``beta=0``): the training step does not use one.

    .venv/bin/python benchmarks/bench_memory.py --peers-python .venv-peers/bin/python     # make bench-memory
    .venv/bin/python benchmarks/bench_memory.py --new-tokens 128 --batch 8 --json /tmp/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_trl_common import current_rss_mib, default_threads, peak_rss_mib  # noqa: E402

# SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M config.json), random weights
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--batch", type=int, default=16, help="sequences in the step")
    p.add_argument("--new-tokens", type=int, default=512, help="completion tokens per sequence (all real)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="longest prompt; the others are left-padded")
    p.add_argument("--chunk", type=int, default=None, help="hfpg logits_chunk_size when on (default: PGConfig's)")
    p.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"], help="decoder layers")
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute the decoder layers' activations in backward on both sides (TRL's default); without it the "
        "layers' activations dominate the peak (and it nears 20 GiB at the defaults)",
    )
    p.add_argument("--peers-python", default=None, help="python of the TRL environment (.venv-peers); none = skip")
    p.add_argument("--threads", type=int, default=default_threads(), help="torch threads in every worker")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    p.add_argument("--worker", choices=("hfpg", "trl"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the shared model and batch (orchestrator, project environment) ------------------------------------------------
def prepare(args, workdir: str) -> None:
    """Save the random model, a tokenizer and the fixed batch into ``workdir``."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": args.layers})
    model = LlamaForCausalLM(config)
    model.save_pretrained(os.path.join(workdir, "model"))
    bpe = ByteLevelBPETokenizer()  # only TRL's constructor reads it: the batch is token ids
    bpe.train_from_iterator(["a tiny corpus for a tokenizer"] * 4, vocab_size=300, special_tokens=["<eos>", "<pad>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<pad>")
    tok.save_pretrained(os.path.join(workdir, "model"))
    g = torch.Generator().manual_seed(0)
    B, P, T, V = args.batch, args.prompt_tokens, args.new_tokens, config.vocab_size
    lengths = torch.randint(max(P - 6, 1), P + 1, (B,), generator=g)
    lengths[0] = P
    prompt_mask = torch.arange(P)[None] >= (P - lengths)[:, None]  # left padding
    prompt_ids = torch.where(prompt_mask, torch.randint(2, V, (B, P), generator=g), config.pad_token_id)
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask.long(),
        "completion_ids": torch.randint(2, V, (B, T), generator=g),
        "completion_mask": torch.ones(B, T, dtype=torch.long),
        "scores": torch.randn(B, generator=g),
    }
    torch.save(batch, os.path.join(workdir, "batch.pt"))


# ---- workers ---------------------------------------------------------------------------------------------------------
def hfpg_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from hfpg import PGConfig, PGTrainer
    from hfpg.forward import rollout_forward
    from hfpg.rollout import Rollout

    t0 = time.perf_counter()
    batch = torch.load(os.path.join(args.workdir, "batch.pt"))
    B, T = batch["completion_ids"].shape
    model_dir = os.path.join(args.workdir, "model")
    chunk = None if args.chunk in (None, 0) else args.chunk
    config = PGConfig(
        output_dir=os.path.join(args.workdir, f"hfpg-{chunk}"),
        algorithm="ppo",
        ppo_epochs=1,
        rollout_batch_size=B,
        mini_batch_size=B,
        kl_coef=0.0,
        max_new_tokens=T,
        min_new_tokens=T,
        logits_chunk_size=chunk,
        gradient_checkpointing=args.gradient_checkpointing,
        report_to=[],
        disable_tqdm=True,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = PGTrainer(
        model,
        AutoTokenizer.from_pretrained(model_dir),
        config,
        train_dataset=[{"prompt": "a"}],
        reward_fn=lambda prompts, completions, **kw: [0.0] * len(completions),
    )
    rollout = Rollout(
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["completion_ids"],
        batch["completion_mask"].bool(),
        torch.ones(B, dtype=torch.bool),
        ref_logprobs=torch.zeros(B, T),
        scores=batch["scores"],
    )
    rule = trainer.algorithm
    assert trainer.unwrapped_model.is_gradient_checkpointing == args.gradient_checkpointing
    assert rule.fuses_policy_forward  # one forward + backward, as PGTrainer.step runs it
    with torch.no_grad():  # a no-grad policy forward pages every loaded weight in, as TRL's old-log-prob pass does
        rollout_forward(trainer.model, rollout, 1.0, with_values=True, logits_chunk_size=1024)  # the same in both
    setup = {"seconds": time.perf_counter() - t0, "rss_mib": current_rss_mib()}
    t, cpu = time.perf_counter(), time.process_time()
    first = rule.training_forward(trainer.model, rollout)
    adv = rule.compute_advantages(rollout, rollout.scores, 0.0, trainer.accelerator)
    metrics = rule.update(
        trainer.model,
        trainer.optimizer,
        trainer.scheduler,
        trainer.accelerator,
        rollout,
        adv["advantages"],
        adv["returns"],
        0.0,
        first,
    )
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    assert metrics["policy/optimizer_steps"] == 1.0
    return {"step_seconds": seconds, "step_cpu_seconds": cpu, "setup": setup, "loss_policy": metrics.get("loss/policy")}


def trl_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    import datasets
    import trl
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    batch = torch.load(os.path.join(args.workdir, "batch.pt"))
    B, T = batch["completion_ids"].shape
    model_dir = os.path.join(args.workdir, "model")
    config = trl.RLOOConfig(
        output_dir=os.path.join(args.workdir, "trl"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=args.gradient_checkpointing,  # transformers 5 renamed it activation_checkpointing
        activation_checkpointing=args.gradient_checkpointing,
        per_device_train_batch_size=B,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=4 if B % 4 == 0 else 2,
        max_completion_length=T,
        beta=0.0,  # no reference model, as hfpg's kl_coef=0
        learning_rate=1e-5,
        optim="adamw_torch",
        disable_dropout=True,
        normalize_advantages=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
    )
    config.model_init_kwargs = {"dtype": torch.float32}
    trainer = trl.RLOOTrainer(
        model=model_dir,
        reward_funcs=lambda prompts, completions, **kw: [0.0] * len(completions),
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * B}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    model = trainer.model
    model.train()
    if config.activation_checkpointing:  # what Trainer.train() does first (TRL's step runs inside train())
        kwargs = dict(config.activation_checkpointing_kwargs or {})
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    assert bool(getattr(model, "is_activation_checkpointing", False)) == args.gradient_checkpointing
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    inputs = {k: v for k, v in batch.items() if k != "scores"}
    scores = batch["scores"].view(-1, config.num_generations)
    loo = (scores.sum(1, keepdim=True) - scores) / (config.num_generations - 1)
    inputs["advantages"] = (scores - loo).reshape(-1)
    with torch.no_grad():  # old log-probs, as TRL's generation phase computes them (not timed)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            T,
        )
    inputs["old_logps"] = (logps * inputs["completion_mask"]).sum(1)
    setup = {"seconds": time.perf_counter() - t0, "rss_mib": current_rss_mib()}
    t, cpu = time.perf_counter(), time.process_time()
    with trainer.compute_loss_context_manager():  # Trainer.training_step without _prepare_inputs (= generation)
        loss = trainer.compute_loss(model, inputs)
    trainer.accelerator.backward(loss)
    trainer.accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"step_seconds": seconds, "step_cpu_seconds": cpu, "setup": setup, "trl": trl.__version__}


def run_worker(args) -> int:
    result = hfpg_worker(args) if args.worker == "hfpg" else trl_worker(args)
    import torch

    result.update({"peak_rss_mib": peak_rss_mib(), "torch": torch.__version__, "threads": torch.get_num_threads()})
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


# ---- orchestrator ----------------------------------------------------------------------------------------------------
def measure(args, python: str, worker: str, workdir: str, chunk: int | None = None) -> dict:
    out = os.path.join(workdir, f"{worker}-{chunk}.json")
    cmd = [python, os.path.abspath(__file__), "--worker", worker, "--workdir", workdir, "--out", out]
    cmd += ["--threads", str(args.threads), "--chunk", str(chunk or 0)]
    cmd += ["--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONWARNINGS"] = "ignore"
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"bench_memory: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    result["process_seconds"] = time.perf_counter() - t
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    from hfpg.forward import DEFAULT_LOGITS_CHUNK_SIZE

    chunk = args.chunk or DEFAULT_LOGITS_CHUNK_SIZE
    columns = [("hfpg, logits_chunk_size=null", "hfpg", None), (f"hfpg, logits_chunk_size={chunk}", "hfpg", chunk)]
    if args.peers_python:
        if not os.path.exists(args.peers_python):
            sys.exit(f"bench_memory: --peers-python {args.peers_python} does not exist (make bench-trl creates it)")
        columns.append(("TRL RLOOTrainer", "trl", None))
    results = {}
    with tempfile.TemporaryDirectory(prefix="hfpg-bench-memory-") as workdir:
        prepare(args, workdir)
        for label, worker, c in columns:
            python = sys.executable if worker == "hfpg" else args.peers_python
            r = measure(args, python, worker, workdir, c)
            results[label] = r
            print(
                f"{label:<34} peak {r['peak_rss_mib']:8.0f} MiB, after setup {r['setup']['rss_mib']:6.0f} MiB, "
                f"step {r['step_seconds']:6.1f} s",
                flush=True,
            )
    V, B, T = SMOLLM2_135M["vocab_size"], args.batch, args.new_tokens
    print()
    print(
        f"SmolLM2-135M architecture ({args.layers} layers, vocabulary {V}, random weights, fp32) | {B} sequences x "
        f"{args.prompt_tokens} prompt + {T} completion tokens | one training step (forward + backward + AdamW) | "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} | {args.threads} threads | "
        "peak RSS of a fresh process per column"
    )
    print(f"(the full logits of this step: {B} x {T + 1} x {V} fp32 = {B * (T + 1) * V * 4 / 2**20:,.0f} MiB a copy)")
    print()
    labels = list(results)
    print("| | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    rows = {
        "peak RSS (MiB)": lambda r: f"{r['peak_rss_mib']:.0f}",
        "RSS after setup (MiB)": lambda r: f"{r['setup']['rss_mib']:.0f}",
        "peak - RSS after setup (MiB)": lambda r: f"{r['peak_rss_mib'] - r['setup']['rss_mib']:.0f}",
        "step time (s)": lambda r: f"{r['step_seconds']:.1f}",
        "step CPU time, all threads (s)": lambda r: f"{r['step_cpu_seconds']:.1f}",
    }
    for name, fmt in rows.items():
        print(f"| {name} | " + " | ".join(fmt(results[k]) for k in labels) + " |")
    base, chunked = results[labels[0]], results[labels[1]]
    print()

    def growth(r):
        return r["peak_rss_mib"] - r["setup"]["rss_mib"]

    print(
        f"chunked / full: peak RSS {chunked['peak_rss_mib'] / base['peak_rss_mib']:.2f}, peak - RSS after setup "
        f"{growth(chunked) / growth(base):.2f}, step time {chunked['step_seconds'] / base['step_seconds']:.2f}"
    )
    if len(labels) > 2:
        trl_peak = results[labels[2]]["peak_rss_mib"]
        verdict = "met" if chunked["peak_rss_mib"] <= trl_peak else "missed"
        print(
            f"target hfpg (chunked) peak <= TRL RLOO's: {verdict} ({chunked['peak_rss_mib']:.0f} vs {trl_peak:.0f} MiB)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": {k: v for k, v in vars(args).items() if k not in ("worker", "workdir", "out")},
                    "model": {**SMOLLM2_135M, "num_hidden_layers": args.layers},
                    "results": results,
                },
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
