"""Multi-process checks, run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU) and, for the
one-process reference, imported in the test process itself.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/multi_process_checks.py MODE OUT_DIR

MODE: ``equivalence`` (one update on a fixed global batch, for each variant), ``learn`` (a short run on the toy
reward), ``dynamic`` (dynamic sampling, each process refilling its own shard), ``critic`` (a separate value model under
DDP), ``resume`` (an interrupted + resumed run against an uninterrupted one) or ``push`` (push_to_hub). Each rank
writes OUT_DIR/<mode>.rank<r>.json (and .pt tensors for the weights).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch
from conftest import make_tokenizer, tiny_gpt2

from hfpg import AutoModelForCausalLMWithValueHead, PGConfig, PGTrainer, TrainerCallback

PROMPTS = [
    "the cat",
    "a good day is here",
    "hello world",
    "policy gradient methods push",
    "a",
    "seven green frogs",
    "the value head",
    "numbers like 1, 2",
]
# Variants of one update on the same global batch. Batch sizes are global; every knob that needs a cross-process
# reduction is on: score whitening, advantage whitening, token-count normalisation, gradient clipping (global norm),
# gradient accumulation, two epochs, a value loss (PPO) and leave-one-out groups + KL as a loss (REINFORCE). 40 of
# the 320 tokens stop a completion, so the two shards hold different numbers of tokens.
VARIANTS = {
    "ppo": dict(
        algorithm="ppo",
        ppo_epochs=2,
        gradient_accumulation_steps=2,
        score_scaling="whiten",
        max_grad_norm=0.5,
        vf_coef=0.5,
    ),
    "rloo": dict(
        algorithm="reinforce",
        advantage_estimator="returns",
        baseline="leave_one_out",
        num_samples_per_prompt=2,
        kl_penalty="loss",
        kl_estimator="k3",
        max_grad_norm=0.5,
    ),
    # the GRPO/DAPO loss family: per-sequence means counted over the global minibatch, truncated completions left
    # out (most are truncated here), GSPO's sequence ratio, and Dr. GRPO's constant normaliser
    "grpo": dict(
        algorithm="ppo",
        advantage_estimator="returns",
        baseline="group_norm",
        num_samples_per_prompt=2,
        ppo_epochs=2,
        gradient_accumulation_steps=2,
        loss_type="grpo",
        mask_truncated_completions=True,
        importance_sampling_level="sequence",
        max_grad_norm=0.5,
    ),
    "dr_grpo": dict(
        algorithm="reinforce",
        advantage_estimator="returns",
        baseline="leave_one_out",
        num_samples_per_prompt=2,
        gradient_accumulation_steps=2,
        loss_type="dr_grpo",
        max_grad_norm=0.5,
    ),
}


def toy_reward(tokenizer):
    """The share of completion tokens that are " good"; records the batch sizes it was called with."""
    target = tokenizer.convert_tokens_to_ids("Ġgood")

    def good_share(prompts, completions, **columns):
        good_share.calls.append(len(completions))
        out = []
        for c in completions:
            ids = tokenizer(c)["input_ids"]
            out.append(sum(i == target for i in ids) / max(len(ids), 1))
        return out

    good_share.calls = []
    return good_share


def length_reward(prompts, completions, **columns):
    return [len(c) / 10 + 0.3 * c.count("e") for c in completions]


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def equivalence(out_dir: str, variant: str, lr: float = 0.5) -> dict:
    """One step on a fixed global batch of 8 sequences; this process trains on its contiguous shard of it.

    The global batch is sampled once, identically on every process (same weights, same seed, all 8 prompts), then each
    process keeps rows [rank·8/P, (rank+1)·8/P). SGD keeps the comparison linear in the gradients (Adam would blow
    float noise in near-zero gradients up to full-size steps).
    """
    tok = make_tokenizer()
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(tok, seed=3))
    torch.nn.init.normal_(model.v_head.summary.weight, std=0.1)  # a non-zero value head: value terms matter
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    cfg = PGConfig(
        output_dir=os.path.join(out_dir, f"eq-{variant}"),
        max_steps=1,
        rollout_batch_size=8,
        mini_batch_size=8,
        max_new_tokens=6,
        report_to=[],
        disable_tqdm=True,
        kl_coef=0.1,
        seed=11,
        stop_token_ids=[*range(60, 100), tok.eos_token_id],
        **VARIANTS[variant],
    )
    rows = [{"prompt": p} for p in PROMPTS]
    trainer = PGTrainer(model, tok, cfg, train_dataset=rows, reward_fn=length_reward, optimizers=(opt, None))
    acc = trainer.accelerator
    before = flat_params(trainer.unwrapped_model)
    k = cfg.num_samples_per_prompt
    global_rows = [r for r in rows[: 8 // k] for _ in range(k)]
    torch.manual_seed(1234)  # the same global batch on every process
    full, timings = trainer.make_rollout(global_rows)
    n = 8 // acc.num_processes
    shard = full.select(slice(acc.process_index * n, (acc.process_index + 1) * n))
    trainer.make_rollout = lambda rows, **kw: (shard, dict(timings))
    metrics = trainer.step()
    after = flat_params(trainer.unwrapped_model)
    torch.save({"before": before, "after": after}, os.path.join(out_dir, f"eq-{variant}.rank{acc.process_index}.pt"))
    return {
        "metrics": metrics,
        "response_lengths": full.response_mask.sum(1).tolist(),
        "num_processes": acc.num_processes,
    }


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step >= self.step:
            trainer.should_stop = True


def learn(out_dir: str) -> dict:
    """A short RLOO run on the toy reward: the reward must rise on two processes as on one."""
    tok = make_tokenizer()
    reward = toy_reward(tok)
    cfg = PGConfig(
        output_dir=os.path.join(out_dir, "learn"),
        max_steps=30,
        rollout_batch_size=32,
        mini_batch_size=16,
        algorithm="reinforce",
        advantage_estimator="returns",
        baseline="leave_one_out",
        num_samples_per_prompt=4,
        learning_rate=1e-2,
        max_new_tokens=8,
        kl_coef=0.01,
        report_to=[],
        disable_tqdm=True,
        save_steps=30,
    )
    rows = [{"prompt": p} for p in PROMPTS[:4]]
    trainer = PGTrainer(tiny_gpt2(tok), tok, cfg, train_dataset=rows, reward_fn=reward)
    trainer.train()
    return {
        "scores": [r["objective/scores"] for r in trainer.log_history],
        "reward_calls": sorted(set(reward.calls)),
        "history": trainer.log_history,
        "local_last_scores": trainer.last_rollout.scores.tolist(),
    }


def critic(out_dir: str) -> dict:
    """PPO with a separate critic (``value_model: policy`` on a full model: a copy, wrapped in DDP like the policy):
    each process trains on its own shard, and DDP keeps the critic's weights the same on both."""
    tok = make_tokenizer()
    cfg = PGConfig(
        output_dir=os.path.join(out_dir, "critic"),
        max_steps=3,
        rollout_batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        value_model="policy",
        value_model_learning_rate=1e-2,
        learning_rate=1e-3,
        max_new_tokens=6,
        report_to=[],
        disable_tqdm=True,
        save_steps=100,
    )
    rows = [{"prompt": p} for p in PROMPTS]
    trainer = PGTrainer(tiny_gpt2(tok), tok, cfg, train_dataset=rows, reward_fn=length_reward)
    critic_model = trainer.accelerator.unwrap_model(trainer.critic.model)
    before = flat_params(critic_model).clone()
    trainer.train()
    after = flat_params(critic_model)
    return {
        "critic_moved": float((after - before).abs().max()),
        "critic_sum": float(after.double().sum()),
        "critic_head": [float(x) for x in after[-8:]],
        "policy_sum": float(flat_params(trainer.unwrapped_model).double().sum()),
        "value_losses": [r["loss/value"] for r in trainer.log_history],
    }


def dynamic(out_dir: str) -> dict:
    """Dynamic sampling on 2 processes: half the prompts give groups of equal scores. Each process drops and refills
    its own groups, and both take the same number of rounds (a process that is already full samples along)."""
    tok = make_tokenizer()
    flat = set(PROMPTS[::2])

    def reward(prompts, completions, **columns):
        return [1.0 if p in flat else i / 10 + len(c) / 100 for i, (p, c) in enumerate(zip(prompts, completions))]

    cfg = PGConfig(
        output_dir=os.path.join(out_dir, "dynamic"),
        max_steps=4,
        rollout_batch_size=8,
        mini_batch_size=8,
        algorithm="reinforce",
        advantage_estimator="returns",
        baseline="group_norm",
        num_samples_per_prompt=2,
        dynamic_sampling=True,
        learning_rate=1e-2,
        max_new_tokens=6,
        report_to=[],
        disable_tqdm=True,
        save_steps=100,
    )
    rows = [{"prompt": p} for p in PROMPTS]
    trainer = PGTrainer(tiny_gpt2(tok), tok, cfg, train_dataset=rows, reward_fn=reward)
    trainer.train()
    return {
        "history": trainer.log_history,
        "last_prompts": list(trainer.last_rollout.prompts),
        "flat": sorted(flat),
        "weights_sum": float(flat_params(trainer.unwrapped_model).double().sum()),
    }


def resume(out_dir: str) -> dict:
    """4 steps straight vs 2 steps, "crash", resume from checkpoint-2 for 2 more — on the same processes."""
    tok = make_tokenizer()

    def run(sub: str, stop: int | None = None, resume_from=None):
        cfg = PGConfig(
            output_dir=os.path.join(out_dir, sub),
            max_steps=4,
            save_steps=2,
            rollout_batch_size=8,
            mini_batch_size=4,
            ppo_epochs=2,
            learning_rate=1e-2,
            max_new_tokens=6,
            kl_coef=0.01,
            adaptive_kl=True,
            kl_target=0.5,
            kl_horizon=50,
            score_scaling="running_std",
            report_to=[],
            disable_tqdm=True,
        )
        rows = [{"prompt": p} for p in PROMPTS]
        trainer = PGTrainer(
            tiny_gpt2(tok),
            tok,
            cfg,
            train_dataset=rows,
            reward_fn=length_reward,
            callbacks=[StopAt(stop)] if stop else None,
        )
        trainer.train(resume_from_checkpoint=resume_from)
        return trainer

    straight = run("straight")
    run("interrupted", stop=2)
    resumed = run("interrupted", resume_from=True)
    same = torch.equal(flat_params(straight.unwrapped_model), flat_params(resumed.unwrapped_model))
    keys = ("objective/scores", "objective/kl", "objective/kl_coef", "loss/policy", "lr")
    return {
        "same_weights": same,
        "straight": [{k: r[k] for k in keys} for r in straight.log_history[2:]],
        "resumed": [{k: r[k] for k in keys} for r in resumed.log_history],
        "resumed_steps": [r["step"] for r in resumed.log_history],
    }


def push(out_dir: str) -> dict:
    """push_to_hub on 2 processes: every process saves together, only the main one uploads, and a refused push
    raises on every process (the outcome is broadcast), so no rank hangs or carries on alone."""
    from hfpg import hub

    tok = make_tokenizer()
    uploads = []

    def fake_push_folder(folder, repo_id, **kw):  # the network boundary; records who called it
        uploads.append({"repo_id": repo_id, "files": sorted(os.listdir(folder))})
        return f"https://huggingface.co/{repo_id}/commit/abc"

    cfg = PGConfig(
        output_dir=os.path.join(out_dir, "push"),
        max_steps=1,
        rollout_batch_size=8,
        mini_batch_size=8,
        max_new_tokens=4,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = PGTrainer(
        tiny_gpt2(tok), tok, cfg, train_dataset=[{"prompt": p} for p in PROMPTS], reward_fn=length_reward
    )
    trainer.train()
    real, hub.push_folder = hub.push_folder, fake_push_folder
    try:
        url = trainer.push_to_hub("someone/tiny-policy")
    finally:
        hub.push_folder = real
    os.environ["HF_HUB_OFFLINE"] = "1"  # the real push refuses before any request, on the main process only
    try:
        trainer.push_to_hub("someone/tiny-policy", token="hf_not_used")
        refused = None
    except hub.HubError as e:
        refused = str(e)
    return {"url": url, "uploads": uploads, "refused": refused}


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode == "equivalence":
        result = {v: equivalence(out_dir, v) for v in VARIANTS}
    else:
        result = {"learn": learn, "resume": resume, "push": push, "dynamic": dynamic, "critic": critic}[mode](out_dir)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"{mode}.rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
