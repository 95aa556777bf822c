"""hfpg's GRPO-style update against TRL 1.16's ``GRPOTrainer`` on one identical batch.

TRL's trainer samples and scores a batch (``_generate_and_score_completions``) and takes its loss's gradient; hfpg's
PGTrainer gets the same prompt and completion tokens as a rollout, scores them with the same reward, computes its
group-normalised advantages and runs its update. With the settings that make the two rules the same method
(REINFORCE, or PPO's clipped surrogate on its first pass; advantages ``(r - mean) / std`` per prompt group,
unwhitened; beta * k3 to the reference as a loss term, weighted by the importance ratio or not as
``use_bias_correction_kl`` says on both sides; the same token normalisation), the gradients agree parameter by
parameter, with the policy moved off the reference first so that the KL term contributes.

Runs where TRL is installed: ``make test-trl-compat`` (the peers environment, with ``HFPG_REQUIRE_TRL=1`` a missing
TRL is a failure); ``make test`` skips it.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import tiny_llama

from hfpg import PGConfig, PGTrainer
from hfpg.forward import rollout_forward
from hfpg.modeling import reference_context
from hfpg.rollout import Rollout, decode_completions

PROMPTS = ["the cat sat on", "a dog ran to", "one two three", "we went home and"]
K = 4  # completions per prompt (TRL's num_generations)
NEW_TOKENS = 8
BETA = 0.1


def trl_module():
    if os.environ.get("HFPG_REQUIRE_TRL"):
        import trl  # noqa: F401  (a failure here is the result: the compat target must have TRL)
    return pytest.importorskip("trl", reason="TRL is installed in .venv-peers (make test-trl-compat)")


def vowel_share(completions, **kwargs):
    """A reward both trainers call the same way: the share of vowels among the completion's letters."""
    out = []
    for c in completions:
        letters = [ch for ch in c.lower() if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / max(len(letters), 1))
    return out


def perturb_(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Move the policy off its reference: the same noise on every parameter, given the same seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def trl_gradient(trl, model_dir: str, tokenizer, tmp_path, loss_type: str, bias_correction: bool):
    from datasets import Dataset

    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        use_cpu=True,
        bf16=False,  # TRL's default; hfpg here runs in fp32
        fp16=False,
        per_device_train_batch_size=len(PROMPTS) * K,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=K,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=BETA,
        loss_type=loss_type,
        use_bias_correction_kl=bias_correction,
        scale_rewards="group",
        disable_dropout=True,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32},
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        seed=0,
    )
    trainer = trl.GRPOTrainer(  # from a folder: TRL loads the reference model from the same path
        model=model_dir,
        reward_funcs=[vowel_share],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )
    perturb_(trainer.model)  # the reference (TRL's copy made at init) keeps the original weights
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(K)])
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, read by the loss
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, batch).backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return batch, grads


def hfpg_gradient(model, tokenizer, tmp_path, batch, algorithm: str, loss_type: str, bias_correction: bool):
    config = PGConfig(
        output_dir=str(tmp_path / "hfpg"),
        algorithm=algorithm,
        advantage_estimator="returns",
        baseline="group_norm",
        whiten_advantages=False,
        loss_type=loss_type,
        kl_penalty="loss",
        kl_coef=BETA,
        kl_estimator="k3",
        use_bias_correction_kl=bias_correction,
        num_samples_per_prompt=K,
        rollout_batch_size=len(PROMPTS) * K,
        mini_batch_size=len(PROMPTS) * K,
        ppo_epochs=1,
        max_new_tokens=NEW_TOKENS,
        max_grad_norm=None,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = PGTrainer(
        model,
        processing_class=tokenizer,
        args=config,
        reward_funcs=vowel_share,
        train_dataset=[{"prompt": p} for p in PROMPTS],
    )
    perturb_(trainer.model.pretrained_model)
    prompts = [p for p in PROMPTS for _ in range(K)]
    ids, mask = batch["completion_ids"], batch["completion_mask"].bool()
    rollout = Rollout(
        batch["prompt_ids"],
        batch["prompt_mask"].bool(),
        ids.masked_fill(~mask, tokenizer.pad_token_id),
        mask,
        (ids == tokenizer.eos_token_id).any(1),
        prompts=prompts,
    )
    with torch.no_grad(), reference_context(trainer.model, trainer.ref_model) as ref:
        rollout.ref_logprobs = rollout_forward(ref, rollout, 1.0, with_values=False)["logprobs"]
    rollout.completions = decode_completions(tokenizer, rollout.response_ids, rollout.response_mask)
    trainer._score(rollout, prompts, conversational=False)
    algo = trainer.algorithm
    first = algo.training_forward(trainer.model, rollout)  # the "old" logprobs: the update's own first forward
    rollout.behaviour_logprobs, rollout.is_weights = rollout.logprobs, rollout.response_mask.float()
    scores = trainer.score_shaper(rollout.scores, rollout.has_stop, trainer.accelerator, rollout.scorable)
    adv = algo.compute_advantages(rollout, scores, BETA, trainer.accelerator)
    grads: dict[str, torch.Tensor] = {}

    def keep_gradients():  # runs after the optimizer step, before zero_grad
        for n, p in trainer.model.pretrained_model.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.detach().clone()

    algo.add_optimizer_step_hook(keep_gradients)
    algo.update(
        trainer.model,
        trainer.optimizer,
        trainer.scheduler,
        trainer.accelerator,
        rollout,
        adv["advantages"],
        adv["returns"],
        BETA,
        first,
    )
    return rollout, adv, grads


@pytest.mark.parametrize(
    "algorithm, loss_type, bias_correction",
    [
        ("reinforce", "dapo", True),  # the README's GRPOTrainer row
        ("ppo", "dapo", True),  # num_iterations > 1's row, on its first pass
        ("ppo", "grpo", True),
        ("ppo", "dr_grpo", True),
        ("reinforce", "dapo", False),
    ],
)
def test_grpo_gradient_matches_trl_on_the_same_batch(algorithm, loss_type, bias_correction, tokenizer, tmp_path):
    trl = trl_module()
    model = tiny_llama(tokenizer)
    model.save_pretrained(tmp_path / "tiny")
    batch, trl_grads = trl_gradient(trl, str(tmp_path / "tiny"), tokenizer, tmp_path, loss_type, bias_correction)
    rollout, adv, hfpg_grads = hfpg_gradient(
        copy.deepcopy(model), tokenizer, tmp_path, batch, algorithm, loss_type, bias_correction
    )
    # the same rewards give the same advantages (TRL's std + 1e-4, hfpg's std + 1e-6: both Bessel-corrected)
    assert adv["advantages"][:, 0] == pytest.approx(batch["advantages"], rel=2e-3, abs=2e-4)
    assert rollout.ref_logprobs.abs().sum() > 0
    assert set(trl_grads) == set(hfpg_grads) and len(trl_grads) > 0
    flat_t = torch.cat([trl_grads[n].flatten() for n in sorted(trl_grads)])
    flat_h = torch.cat([hfpg_grads[n].flatten() for n in sorted(trl_grads)])
    assert flat_t.norm() > 0
    assert torch.allclose(flat_h, flat_t, rtol=1e-3, atol=1e-3 * flat_t.abs().max().item())
    assert torch.nn.functional.cosine_similarity(flat_h, flat_t, dim=0) > 0.9999
    assert flat_h.norm() / flat_t.norm() == pytest.approx(1.0, rel=2e-3)
