"""The GRPO/DAPO loss family: loss_type (dapo | grpo | dr_grpo), mask_truncated_completions and GSPO's sequence-level
ratio, each against numbers computed by hand; their config checks; and short learning runs on the toy task."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from test_trainer import assert_toy_reward_rose, make_trainer, target_share

from hfpg import ConfigError, PGConfig, ops
from hfpg.algorithms import build_algorithm
from hfpg.algorithms import minibatch as minibatch_module
from hfpg.rollout import Rollout


# ---- GSPO: the sequence-level ratio in its token form --------------------------------------------------------------
def test_sequence_level_ratio_clips_whole_sequences_and_passes_s_times_grad_log_pi_to_each_token():
    old = torch.zeros(3, 3)
    # log π − log π_old per token; the last column of row 0 is padding (its 9.0 must not count)
    log_ratio = torch.tensor([[0.1, 0.2, 9.0], [0.5, -0.1, 0.0], [0.5, -0.1, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False], [True, True, False]])
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3, [1.0] * 3])
    logp = log_ratio.clone().requires_grad_(True)
    loss, clipped, ratio = ops.ppo_policy_loss(logp, old, adv, 0.2, mask=mask, importance_sampling_level="sequence")
    s0, s1 = math.exp(0.15), math.exp(0.2)  # exp of the mean over real tokens: (0.1+0.2)/2, (0.5-0.1)/2
    expected_ratio = torch.tensor([[s0, s0, s0], [s1, s1, s1], [s1, s1, s1]])
    torch.testing.assert_close(ratio.detach(), expected_ratio)
    # row 0: A=1, s=1.162 < 1.2: unclipped, loss −s. Row 1: A=−1, −A·s = 1.221 > −A·1.2: unclipped, loss s.
    # Row 2: A=1, s=1.221 > 1.2: the clipped branch −1.2 is larger, for BOTH tokens (a token ratio would clip only
    # the first, exp(0.5), and not the second, exp(−0.1))
    expected_loss = torch.tensor([[-s0, -s0], [s1, s1], [-1.2, -1.2]])
    torch.testing.assert_close(loss.detach()[:, :2], expected_loss)
    assert clipped[:, :2].tolist() == [[False, False], [False, False], [True, True]]
    ops.masked_sum(loss, mask).backward()
    # d(−A·s_i,t)/d log π_t = −A·s_i at each real token of an unclipped sequence (sg[s_i]·π_t/sg[π_t]); clipped: 0
    expected_grad = torch.tensor([[-s0, -s0, 0.0], [s1, s1, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected_grad)


def test_token_level_ratio_is_unchanged():
    logp = torch.tensor([[0.5, -0.1]])
    loss, clipped, ratio = ops.ppo_policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), 0.2)
    torch.testing.assert_close(ratio, torch.tensor([[math.exp(0.5), math.exp(-0.1)]]))
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -math.exp(-0.1)]]))
    assert clipped.tolist() == [[True, False]]


# ---- loss_type and mask_truncated_completions through the real minibatch loop --------------------------------------
class LogprobTable(torch.nn.Module):
    """A 'policy' whose response logprobs are its parameter: the update's gradient is d loss / d log π itself."""

    def __init__(self, logprobs: torch.Tensor):
        super().__init__()
        self.logprobs = torch.nn.Parameter(logprobs.clone())


def _update_gradient(monkeypatch, *, advantages, mask, has_stop, accumulation=1, ref=None, **cfg):
    """Run REINFORCE's real update (one SGD step, lr 1) on a LogprobTable; return −Δ = the gradient of the loss.
    The policy's logprobs start at 0; ``ref``: the reference's (default 0)."""
    B, T = mask.shape
    start = torch.zeros(B, T)

    def fake_forward(model, rollout, temperature, *, rows=None, **kw):
        lp = model.logprobs if rows is None else model.logprobs[rows]
        return {"logprobs": lp, "entropy": torch.zeros_like(lp)}

    monkeypatch.setattr(minibatch_module, "rollout_forward", fake_forward)
    config = PGConfig(
        algorithm="reinforce",
        advantage_estimator="returns",
        rollout_batch_size=B,
        mini_batch_size=B,
        gradient_accumulation_steps=accumulation,
        max_new_tokens=T,
        max_grad_norm=None,
        **cfg,
    )
    rule = build_algorithm(config)
    model = LogprobTable(start)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    rollout = Rollout(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long),
        prompt_mask=torch.ones(B, 1, dtype=torch.bool),
        response_ids=torch.zeros(B, T, dtype=torch.long),
        response_mask=mask,
        has_stop=has_stop,
        logprobs=start.clone(),
        ref_logprobs=torch.zeros(B, T) if ref is None else ref,
    )
    metrics = rule.update(
        model, optimizer, scheduler, Accelerator(cpu=True), rollout, advantages, advantages, kl_coef=0.5
    )
    return start - model.logprobs.detach(), metrics


# seq 0: 3 real tokens, A = 1; seq 1: 1 real token, A = 2. REINFORCE's token loss −A·log π has gradient −A.
MASK = torch.tensor([[True, True, True], [True, False, False]])
ADV = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
# (loss_type, mask_truncated_completions, expected gradient by hand); seq 1 has no stop token
CASES = [
    # dapo: Σ / 4 real tokens
    ("dapo", False, [[-1 / 4, -1 / 4, -1 / 4], [-2 / 4, 0, 0]]),
    # grpo: seq 0's tokens weigh 1/3, seq 1's 1; then / 2 sequences
    ("grpo", False, [[-1 / 6, -1 / 6, -1 / 6], [-2 / 2, 0, 0]]),
    # dr_grpo: Σ / (2 sequences × max_new_tokens 3)
    ("dr_grpo", False, [[-1 / 6, -1 / 6, -1 / 6], [-2 / 6, 0, 0]]),
    # truncated seq 1 masked: dapo Σ / 3 tokens; grpo: / 1 sequence, weight 1/3; dr_grpo keeps its constant 6
    ("dapo", True, [[-1 / 3, -1 / 3, -1 / 3], [0, 0, 0]]),
    ("grpo", True, [[-1 / 3, -1 / 3, -1 / 3], [0, 0, 0]]),
    ("dr_grpo", True, [[-1 / 6, -1 / 6, -1 / 6], [0, 0, 0]]),
]


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("loss_type, mask_truncated, expected", CASES)
def test_loss_type_normalisation_by_hand(loss_type, mask_truncated, expected, accumulation, monkeypatch):
    grad, metrics = _update_gradient(
        monkeypatch,
        advantages=ADV,
        mask=MASK,
        has_stop=torch.tensor([True, False]),
        accumulation=accumulation,  # micro-batches of one sequence give the same gradient
        loss_type=loss_type,
        mask_truncated_completions=mask_truncated,
    )
    torch.testing.assert_close(grad, torch.tensor(expected))
    if mask_truncated:
        assert metrics["policy/truncated_masked_fraction"] == pytest.approx(0.5)
    else:
        assert "policy/truncated_masked_fraction" not in metrics


def test_kl_as_a_loss_term_goes_through_the_same_weights(monkeypatch):
    # grpo with kl_penalty=loss (k1 = log π − log π_ref, β = 0.5): each token's loss gradient is −A + 0.5,
    # weighted 1/3 (seq 0) or 1 (seq 1), over 2 sequences
    grad, _ = _update_gradient(
        monkeypatch,
        advantages=ADV,
        mask=MASK,
        has_stop=torch.tensor([True, True]),
        loss_type="grpo",
        kl_penalty="loss",
        kl_estimator="k1",
    )
    g0 = (-1 + 0.5) / 3 / 2
    torch.testing.assert_close(grad, torch.tensor([[g0, g0, g0], [(-2 + 0.5) / 2, 0, 0]]))


@pytest.mark.parametrize("bias_correction", [True, False])
def test_kl_loss_bias_correction_by_hand(bias_correction, monkeypatch):
    # k3 as a loss term, β = 0.5, log π = 0, log π_ref = ρ per token, A = 0 (the KL term alone), dapo over 4 tokens.
    # Corrected, the term is r·k3 with r = π/π_old (1 in value): d/dlog π = log π − log π_ref = −ρ, the gradient of
    # KL(π ‖ π_ref). Uncorrected, k3 alone: d/dlog π = 1 − π_ref/π = 1 − e^ρ, the gradient of KL(π_ref ‖ π).
    ref = torch.tensor([[-0.5, 0.3, 1.0], [-2.0, 0.0, 0.0]])
    grad, metrics = _update_gradient(
        monkeypatch,
        advantages=torch.zeros(2, 3),
        mask=MASK,
        has_stop=torch.tensor([True, True]),
        ref=ref,
        loss_type="dapo",
        kl_penalty="loss",
        kl_estimator="k3",
        use_bias_correction_kl=bias_correction,
    )
    per_token = -ref if bias_correction else 1 - ref.exp()
    torch.testing.assert_close(grad, 0.5 * per_token * MASK / 4)
    # the logged KL is the k3 estimate itself either way: e^ρ − 1 − ρ over the 4 real tokens
    k3 = ref.exp() - 1 - ref
    assert metrics["loss/kl"] == pytest.approx((k3 * MASK).sum().item() / 4, rel=1e-5)


# ---- config checks -------------------------------------------------------------------------------------------------
def test_loss_family_config_errors_name_the_problem_and_the_fix():
    with pytest.raises(ConfigError, match=r"TRPO's surrogate and trust region are token means.*set loss_type: dapo"):
        PGConfig(algorithm="trpo", loss_type="grpo")
    with pytest.raises(ConfigError, match="mask_truncated_completions=True applies to algorithm ppo or reinforce"):
        PGConfig(algorithm="trpo", mask_truncated_completions=True)
    with pytest.raises(ConfigError, match="algorithm reinforce has no ratio to clip: set algorithm: ppo"):
        PGConfig(algorithm="reinforce", advantage_estimator="returns", importance_sampling_level="sequence")
    with pytest.raises(ConfigError, match="loss_type='mean' is not one of"):
        PGConfig(loss_type="mean")
    with pytest.raises(ConfigError, match="importance_sampling_level='sequence_token' is not one of"):
        PGConfig(importance_sampling_level="sequence_token")
    cfg = PGConfig(loss_type="dr_grpo", mask_truncated_completions=True, importance_sampling_level="sequence")
    assert (cfg.loss_type, cfg.importance_sampling_level) == ("dr_grpo", "sequence")
    assert PGConfig().loss_type == "dapo" and not PGConfig().mask_truncated_completions
    with pytest.raises(
        ConfigError, match=r"use_bias_correction_kl=false changes the KL loss term.*set kl_penalty: loss"
    ):
        PGConfig(use_bias_correction_kl=False)
    assert (
        PGConfig().use_bias_correction_kl
        and not PGConfig(kl_penalty="loss", use_bias_correction_kl=False).use_bias_correction_kl
    )


# ---- learning on the toy task --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        dict(algorithm="reinforce", baseline="group_norm", loss_type="grpo"),
        dict(
            algorithm="ppo",
            ppo_epochs=2,
            baseline="group_norm",
            loss_type="dapo",
            clip_range_high=0.28,
            mask_truncated_completions=True,
            stop_token_ids="last_80",  # a quarter of the vocabulary stops a completion: some stop, some are cut
        ),
        dict(algorithm="ppo", ppo_epochs=2, baseline="group_norm", importance_sampling_level="sequence"),
        dict(algorithm="reinforce", baseline="leave_one_out", loss_type="dr_grpo"),
    ],
    ids=["grpo", "dapo-style", "gspo", "dr-grpo"],
)
def test_loss_family_raises_the_toy_reward(overrides, tokenizer, tmp_path):
    if overrides.get("stop_token_ids") == "last_80":
        target = tokenizer.convert_tokens_to_ids("Ġgood")
        overrides["stop_token_ids"] = [i for i in range(len(tokenizer) - 80, len(tokenizer)) if i != target]
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        max_steps=40,
        rollout_batch_size=32,
        mini_batch_size=16,
        max_new_tokens=8,
        advantage_estimator="returns",
        num_samples_per_prompt=4,
        reward=target_share(tokenizer),
        **overrides,
    )
    trainer.train()
    assert_toy_reward_rose(trainer)
    if overrides.get("mask_truncated_completions"):  # completions were left out, not all of them
        assert all(0 < r["policy/truncated_masked_fraction"] < 1 for r in trainer.log_history[:3])
