"""REINFORCE, critic-free baselines, TRPO and replay: docs/design.md detail 17 and the equivalences between them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import small_run, tiny_gpt2
from peft import LoraConfig
from test_trainer import PROMPTS, assert_toy_reward_rose, length_reward, make_trainer, params, target_share

from hfpg import AutoModelForCausalLMWithValueHead, ConfigError, PGConfig, PGTrainer, ops
from hfpg.algorithms.advantages import MovingAverageBaseline, compute_advantages
from hfpg.rollout import Rollout


# ---- pure maths ----------------------------------------------------------------------------------------------------
def test_reinforce_gradient_has_the_right_sign_on_a_two_armed_bandit():
    """Detail 17: arm 0 pays 1, arm 1 pays 0; a gradient step on -A·log π raises the better arm's logit."""
    torch.manual_seed(0)
    theta = torch.zeros(2, requires_grad=True)
    probs = torch.softmax(theta, -1)
    actions = torch.multinomial(probs.detach(), 64, replacement=True)
    rewards = (actions == 0).float()
    advantages = rewards - rewards.mean()
    logprobs = torch.log_softmax(theta, -1)[actions]
    ops.pg_loss(logprobs, advantages).mean().backward()
    # by hand: ∇θ log π(a) = onehot(a) - π, so ∇loss = -mean_i A_i (onehot(a_i) - π)
    onehot = torch.nn.functional.one_hot(actions, 2).float()
    want = -(advantages[:, None] * (onehot - probs.detach())).mean(0)
    torch.testing.assert_close(theta.grad, want)
    assert theta.grad[0] < 0 < theta.grad[1]  # descent raises arm 0, lowers arm 1
    with torch.no_grad():
        theta -= 1.0 * theta.grad
    assert torch.softmax(theta, -1)[0] > 0.5


def test_leave_one_out_excludes_the_sample_itself():
    returns = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0, 4.0, 4.0, 8.0])
    got = ops.leave_one_out_baseline(returns, group_size=4)
    want = torch.tensor([15 / 3, 14 / 3, 13 / 3, 6 / 3, 16 / 3, 12 / 3, 12 / 3, 8 / 3])
    torch.testing.assert_close(got, want)
    changed = returns.clone()
    changed[3] = -100.0  # a sample's own return never enters its own baseline
    assert ops.leave_one_out_baseline(changed, 4)[3] == got[3]
    with pytest.raises(ValueError, match="at least 2 samples"):
        ops.leave_one_out_baseline(returns, 1)


def _rollout(scores_len: list[int], values=None) -> Rollout:
    B, T = len(scores_len), max(scores_len)
    mask = torch.arange(T)[None] < torch.tensor(scores_len)[:, None]
    z = torch.zeros(B, T)
    ids = torch.zeros(B, T, dtype=torch.long)
    return Rollout(
        ids[:, :1],
        torch.ones(B, 1),
        ids,
        mask,
        torch.ones(B, dtype=torch.bool),
        logprobs=z.clone(),
        ref_logprobs=z.clone(),
        values=values if values is not None else z.clone(),
    )


def _cfg(**kw) -> PGConfig:
    base = dict(
        advantage_estimator="returns",
        whiten_advantages=False,
        gamma=1.0,
        kl_coef=0.0,
        rollout_batch_size=4,
        mini_batch_size=4,
    )
    base.update(kw)
    return PGConfig(**base)


def test_group_norm_matches_a_hand_computation():
    r = _rollout([2, 3, 1, 2])
    scores = torch.tensor([1.0, 3.0, 0.0, 4.0])
    adv = compute_advantages(r, scores, 0.0, _cfg(baseline="group_norm", num_samples_per_prompt=2))["advantages"]
    # groups (1, 3) and (0, 4): mean 2 / std √2 and mean 2 / std √8 (unbiased); γ = 1 so every token has G = score
    want = [(1 - 2) / 2**0.5, (3 - 2) / 2**0.5, (0 - 2) / 8**0.5, (4 - 2) / 8**0.5]
    for i, n in enumerate([2, 3, 1, 2]):
        torch.testing.assert_close(adv[i, :n], torch.full((n,), want[i]), rtol=1e-5, atol=1e-5)
        assert (adv[i, n:] == 0).all()


def test_whitening_defaults_to_off_for_the_leave_one_out_baseline_only():
    r = _rollout([2, 2, 2, 2])
    scores = torch.tensor([1.0, 3.0, 0.0, 4.0])
    loo = dict(baseline="leave_one_out", num_samples_per_prompt=2, whiten_advantages=None)
    adv = compute_advantages(r, scores, 0.0, _cfg(**loo))["advantages"]
    # leave-one-out with k = 2: the other sample's score, not whitened: 1 - 3, 3 - 1, 0 - 4, 4 - 0
    torch.testing.assert_close(adv[:, 0], torch.tensor([-2.0, 2.0, -4.0, 4.0]))
    whitened = compute_advantages(r, scores, 0.0, _cfg(**{**loo, "whiten_advantages": True}))["advantages"]
    # whitened over the 8 real tokens (±2, ±4 twice each; mean 0, unbiased variance 80/7)
    torch.testing.assert_close(whitened[:, 0], torch.tensor([-2.0, 2.0, -4.0, 4.0]) / (80 / 7) ** 0.5)
    assert not PGConfig(algorithm="reinforce", advantage_estimator="returns", **loo).whitens_advantages
    assert PGConfig(advantage_estimator="returns", baseline="group_norm", num_samples_per_prompt=2).whitens_advantages
    assert PGConfig().whitens_advantages  # PPO with GAE and its critic
    assert PGConfig(advantage_estimator="returns", baseline="moving_average").whitens_advantages
    assert PGConfig(advantage_estimator="returns", baseline="none").whitens_advantages


def test_returns_with_no_value_and_moving_average_baselines():
    r = _rollout([2, 2], values=torch.tensor([[0.5, 0.25], [1.0, 0.0]]))
    scores = torch.tensor([1.0, 3.0])
    none = compute_advantages(r, scores, 0.0, _cfg(baseline="none", gamma=0.5, rollout_batch_size=2, mini_batch_size=2))
    # G_t with γ = 0.5 and the score at the last token: [0.5, 1] and [1.5, 3]
    torch.testing.assert_close(none["advantages"], torch.tensor([[0.5, 1.0], [1.5, 3.0]]))
    value = compute_advantages(
        r, scores, 0.0, _cfg(baseline="value", gamma=0.5, rollout_batch_size=2, mini_batch_size=2)
    )
    torch.testing.assert_close(value["advantages"], torch.tensor([[0.0, 0.75], [0.5, 3.0]]))
    ema = MovingAverageBaseline(0.9)
    cfg = _cfg(baseline="moving_average", rollout_batch_size=2, mini_batch_size=2)
    first = compute_advantages(r, scores, 0.0, cfg, moving_average=ema)["advantages"]
    torch.testing.assert_close(first, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))  # baseline = this batch's mean 2
    second = compute_advantages(r, scores + 10, 0.0, cfg, moving_average=ema)["advantages"]
    torch.testing.assert_close(second, torch.tensor([[9.0, 9.0], [11.0, 11.0]]))  # baseline still 2, from the past
    assert ema.value == pytest.approx(0.9 * 2 + 0.1 * 12)


def test_kl_as_a_loss_term_leaves_it_out_of_the_rewards():
    r = _rollout([2, 2])
    r.logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    r.ref_logprobs = torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])
    scores = torch.tensor([1.0, 2.0])
    in_reward = compute_advantages(r, scores, 0.5, _cfg(kl_penalty="reward", rollout_batch_size=2, mini_batch_size=2))
    in_loss = compute_advantages(r, scores, 0.5, _cfg(kl_penalty="loss", rollout_batch_size=2, mini_batch_size=2))
    torch.testing.assert_close(in_reward["rewards"], torch.tensor([[-0.5, 0.5], [-0.5, 1.5]]))
    torch.testing.assert_close(in_loss["rewards"], torch.tensor([[0.0, 1.0], [0.0, 2.0]]))


def test_conjugate_gradient_solves_a_spd_system():
    torch.manual_seed(0)
    m = torch.randn(6, 6)
    a = m @ m.T + 6 * torch.eye(6)
    b = torch.randn(6)
    x, residual = ops.conjugate_gradient(lambda v: a @ v, b, iters=20)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-4, atol=1e-5)
    assert residual < 1e-8


# ---- config --------------------------------------------------------------------------------------------------------
def test_invalid_algorithm_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="applies to advantage_estimator=returns"):
        PGConfig(baseline="leave_one_out", num_samples_per_prompt=4)
    with pytest.raises(ConfigError, match="set num_samples_per_prompt >= 2"):
        PGConfig(advantage_estimator="returns", baseline="group_norm")
    with pytest.raises(ConfigError, match=r"num_samples_per_prompt \(3\) so each process holds whole groups"):
        PGConfig(advantage_estimator="returns", baseline="leave_one_out", num_samples_per_prompt=3)
    with pytest.raises(ConfigError, match="replay needs both"):
        PGConfig(replay_buffer_size=16)
    with pytest.raises(ConfigError, match="replay is for ppo and reinforce"):
        PGConfig(algorithm="trpo", replay_buffer_size=16, replay_batch_size=8)


# ---- trainer-level equivalences ------------------------------------------------------------------------------------
def _sgd_trainer(tokenizer, tmp_path, **overrides):
    model = AutoModelForCausalLMWithValueHead(tiny_gpt2(tokenizer))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    fixed = dict(output_dir=str(tmp_path), max_steps=1, rollout_batch_size=8, mini_batch_size=8, max_new_tokens=6)
    fixed.update(lr_scheduler_type="constant", max_grad_norm=None, kl_coef=0.05)  # SGD's lr, no clipping
    return PGTrainer(
        model,
        tokenizer,
        PGConfig(**small_run(tmp_path, **{**fixed, **overrides})),
        train_dataset=[{"prompt": p} for p in PROMPTS * 2],
        reward_fn=length_reward,
        optimizers=(sgd, None),
    )


def test_ppo_one_epoch_lambda_one_equals_reinforce_with_a_value_baseline(tokenizer, tmp_path):
    """At ratio 1 the clipped surrogate's gradient is -A ∇log π, GAE(λ=1) is G - V, and the clipped value loss
    equals the plain one: one SGD step of each gives the same weights."""
    ppo = _sgd_trainer(tokenizer, tmp_path / "ppo", algorithm="ppo", advantage_estimator="gae", lam=1.0)
    ppo.train()
    reinforce = _sgd_trainer(
        tokenizer, tmp_path / "rf", algorithm="reinforce", advantage_estimator="returns", baseline="value"
    )
    reinforce.train()
    a, b = params(ppo.unwrapped_model), params(reinforce.unwrapped_model)
    init = params(AutoModelForCausalLMWithValueHead(tiny_gpt2(tokenizer)))
    assert sum(not torch.equal(init[k], a[k]) for k in a) > 5
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    lam95 = _sgd_trainer(tokenizer, tmp_path / "ppo95", algorithm="ppo", advantage_estimator="gae", lam=0.5)
    lam95.train()  # negative control: another λ gives another update
    assert any(not torch.allclose(a[k], v, atol=1e-6) for k, v in params(lam95.unwrapped_model).items())


def test_samples_per_prompt_form_contiguous_groups(tokenizer, tmp_path):
    seen = []

    def spy(prompts, completions, **kw):
        seen.append(prompts)
        return [float(len(c)) for c in completions]

    trainer = make_trainer(
        tokenizer,
        tmp_path,
        reward=spy,
        max_steps=1,
        algorithm="reinforce",
        advantage_estimator="returns",
        baseline="leave_one_out",
        num_samples_per_prompt=4,
        rollout_batch_size=8,
        mini_batch_size=8,
    )
    trainer.train()
    prompts = seen[0]
    assert len(prompts) == 8 and prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4
    assert prompts[0] != prompts[4]  # two different prompts, four samples each


# ---- TRPO ----------------------------------------------------------------------------------------------------------
def _capture_update(trainer):
    captured = {}
    original = trainer.algorithm.update

    def spy(model, optimizer, scheduler, accelerator, rollout, advantages, returns, kl_coef=0.0, first_forward=None):
        captured.update(
            rollout=rollout,
            advantages=advantages.clone(),
            before=copy.deepcopy(accelerator.unwrap_model(model).pretrained_model),
        )
        return original(model, optimizer, scheduler, accelerator, rollout, advantages, returns, kl_coef, first_forward)

    trainer.algorithm.update = spy
    return captured


def _log_dist(lm, r, temperature=1.0):
    ids = torch.cat([r.prompt_ids, r.response_ids], 1)
    att = torch.cat([r.prompt_mask.long(), r.response_mask.long()], 1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    T = r.response_ids.shape[1]
    logits = lm(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -(T + 1) : -1]
    return torch.log_softmax(logits.float() / temperature, -1)


def test_trpo_accepted_step_respects_the_trust_region_and_improves_the_surrogate(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer, tmp_path, algorithm="trpo", max_kl=0.02, max_steps=1, rollout_batch_size=16, mini_batch_size=8
    )
    captured = _capture_update(trainer)
    m = trainer.train()
    assert m["trpo/accepted"] == 1.0
    r, adv = captured["rollout"], captured["advantages"]
    with torch.no_grad():
        old = _log_dist(captured["before"], r)
        new = _log_dist(trainer.unwrapped_model.pretrained_model, r)
    mask = r.response_mask
    kl = ops.masked_mean((old.exp() * (old - new)).sum(-1), mask)  # written out independently of hfpg's TRPO
    assert 0 < kl <= 0.02 and kl == pytest.approx(m["trpo/kl"], rel=1e-3)
    new_lp = new.gather(-1, r.response_ids[..., None]).squeeze(-1)
    gain = ops.masked_mean(torch.exp(new_lp - r.logprobs) * adv, mask) - ops.masked_mean(adv, mask)
    assert gain > 0 and gain.item() == pytest.approx(m["trpo/surrogate_gain"], rel=1e-3)


def test_trpo_steps_reach_the_trust_region_boundary_with_default_damping(tokenizer, tmp_path):
    """The step length comes from the undamped curvature (and a measured KL): with cg_damping 0.1 the accepted steps
    used to reach about a fifth of max_kl (0.0019-0.0021 at δ 0.01 on this model); now at least half of it."""
    trainer = make_trainer(
        tokenizer, tmp_path, algorithm="trpo", max_kl=0.01, max_steps=3, rollout_batch_size=16, mini_batch_size=8
    )
    assert trainer.config.cg_damping == 0.1
    kls = []
    original = trainer.algorithm.update

    def spy(*args, **kwargs):
        m = original(*args, **kwargs)
        assert m["trpo/accepted"] == 1.0
        kls.append(m["trpo/kl"])
        return m

    trainer.algorithm.update = spy
    trainer.train()
    assert len(kls) == 3 and all(0.5 * 0.01 <= kl <= 0.01 for kl in kls), kls


def test_trpo_rejected_line_search_leaves_the_policy_unchanged(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer, tmp_path, algorithm="trpo", max_steps=1, line_search_steps=3, line_search_accept_ratio=1e9
    )  # no step can gain a billion times what was expected
    before = params(trainer.unwrapped_model)
    m = trainer.train()
    assert m["trpo/accepted"] == 0.0 and m["trpo/line_search_tries"] == 3
    after = params(trainer.unwrapped_model)
    for k in before:
        if not k.startswith("v_head."):  # the value head is fitted by its own optimizer either way
            assert torch.equal(before[k], after[k]), k


def test_trpo_on_lora_adapters_moves_only_the_adapters(tokenizer, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(tokenizer), peft_config=lora)
    trainer = make_trainer(tokenizer, tmp_path, model=model, algorithm="trpo", max_kl=0.01, max_steps=2)
    before = params(trainer.unwrapped_model)
    m = trainer.train()
    after = params(trainer.unwrapped_model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("lora_" in k for k in changed) and all("lora_" in k or k.startswith("v_head") for k in changed)
    assert m["trpo/accepted"] == 1.0 and m["trpo/kl"] <= 0.01


# ---- replay --------------------------------------------------------------------------------------------------------
def test_replay_with_zero_staleness_equals_no_replay(tokenizer, tmp_path):
    """Data replayed under the policy that generated it gets importance weight 1: the update is the one a fresh batch
    of the same sequences would give. A policy that moved since (staleness) changes the weights."""
    trainer = _sgd_trainer(tokenizer, tmp_path, replay_buffer_size=8, replay_batch_size=8)
    rows = [{"prompt": p} for p in PROMPTS * 2]
    torch.manual_seed(1)
    old, _ = trainer.make_rollout(rows)
    old_scores = trainer.score_shaper(old.scores, old.has_stop, trainer.accelerator)
    trainer.replay.add(old, old_scores, step=0)
    fresh, _ = trainer.make_rollout(rows)
    scores = trainer.score_shaper(fresh.scores, fresh.has_stop, trainer.accelerator)
    batch, batch_scores, metrics = trainer._add_replay(fresh, scores)
    assert metrics["replay/ratio"] == 0.5 and metrics["replay/staleness"] == 0.0
    replayed_w = batch.is_weights[8:][batch.response_mask[8:]]
    torch.testing.assert_close(replayed_w, torch.ones_like(replayed_w), atol=1e-5, rtol=0)

    # the same sequences treated as fresh: generation-time logprobs as the old policy, weight 1
    plain = copy.copy(batch)
    plain.logprobs, plain.is_weights = batch.behaviour_logprobs, batch.response_mask.float()
    start = params(trainer.unwrapped_model)
    results = []
    for b in (batch, plain):
        trainer.unwrapped_model.load_state_dict(start)
        torch.manual_seed(0)
        adv = trainer.algorithm.compute_advantages(b, batch_scores, 0.05, trainer.accelerator)
        trainer.algorithm.update(
            trainer.model,
            trainer.optimizer,
            trainer.scheduler,
            trainer.accelerator,
            b,
            adv["advantages"],
            adv["returns"],
            0.05,
        )
        results.append(params(trainer.unwrapped_model))
    for k in start:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-6)

    trainer.unwrapped_model.load_state_dict(start)
    with torch.no_grad():  # now the policy has moved since the data was generated
        trainer.unwrapped_model.pretrained_model.lm_head.weight.mul_(3.0)
    stale, _, _ = trainer._add_replay(fresh, scores)
    w = stale.is_weights[8:][stale.response_mask[8:]]
    assert (w < 0.99).any() and (w <= 1.0).all()  # truncated at replay_is_clip = 1


def test_replay_metrics_in_a_run(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=3, replay_buffer_size=16, replay_batch_size=4)
    trainer.train()
    first, last = trainer.log_history[0], trainer.log_history[-1]
    assert first["replay/ratio"] == 0.0  # nothing to replay yet
    assert last["replay/ratio"] == pytest.approx(4 / 12)
    assert last["replay/staleness"] >= 1.0 and 0.0 < last["replay/is_weight"] <= 1.0
    assert len(trainer.replay) == 16


# ---- every algorithm learns the toy task ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        dict(algorithm="reinforce", advantage_estimator="returns", baseline="leave_one_out", num_samples_per_prompt=4),
        dict(algorithm="reinforce", advantage_estimator="returns", baseline="value"),
        dict(algorithm="ppo", kl_penalty="loss", kl_estimator="k3"),
        dict(algorithm="trpo", max_kl=0.05),
    ],
    ids=["reinforce-rloo", "reinforce-value", "ppo-kl-loss", "trpo"],
)
def test_each_algorithm_raises_the_toy_reward(overrides, tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        max_steps=40,
        rollout_batch_size=32,
        mini_batch_size=16,
        ppo_epochs=4,
        max_new_tokens=8,
        reward=target_share(tokenizer),
        **overrides,
    )
    trainer.train()
    assert_toy_reward_rose(trainer)
    assert all(math.isfinite(r["objective/kl"]) for r in trainer.log_history)


def test_min_p_reaches_generation(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, min_p=0.05)
    assert trainer.generation_config.min_p == 0.05


def test_resume_is_exact_with_replay_and_a_moving_average_baseline(tokenizer, tmp_path):
    from test_trainer import StopAt

    kw = dict(
        max_steps=4,
        save_steps=2,
        algorithm="reinforce",
        advantage_estimator="returns",
        baseline="moving_average",
        replay_buffer_size=16,
        replay_batch_size=4,
    )
    straight = make_trainer(tokenizer, tmp_path / "a", **kw)
    straight.train()
    interrupted = make_trainer(tokenizer, tmp_path / "b", **kw)
    interrupted.callbacks.append(StopAt(2))
    interrupted.train()
    resumed = make_trainer(tokenizer, tmp_path / "b", **kw)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.algorithm.moving_average.value == straight.algorithm.moving_average.value
    a, b = params(straight.unwrapped_model), params(resumed.unwrapped_model)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- one forward fewer when the update is one step over the whole batch -------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        dict(algorithm="reinforce", advantage_estimator="returns", baseline="leave_one_out", num_samples_per_prompt=2),
        dict(algorithm="ppo", ppo_epochs=1, ent_coef=0.01),
    ],
    ids=["reinforce-rloo", "ppo-1-epoch"],
)
def test_fused_policy_forward_gives_the_same_update_with_one_forward_fewer(overrides, tokenizer, tmp_path, monkeypatch):
    """Same gradients and metrics with and without the separate no-grad forward (compared at the first optimizer
    step: Adam turns float noise in near-zero gradients into full-size steps, so later weights are not comparable)."""
    import hfpg.forward as forward_module  # every forward over a response goes through its sequence_forward

    calls = {"n": 0}
    original = forward_module.sequence_forward

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(forward_module, "sequence_forward", counted)
    runs = {}
    for fuse in (True, False):
        calls["n"] = 0
        trainer = make_trainer(
            tokenizer, tmp_path / str(fuse), max_steps=1, mini_batch_size=8, fuse_policy_forward=fuse, **overrides
        )
        assert trainer.algorithm.fuses_policy_forward is fuse
        grads, step = {}, trainer.optimizer.step

        def capture(*args, _step=step, _trainer=trainer, _grads=grads, **kwargs):
            _grads.update(
                {n: p.grad.clone() for n, p in _trainer.unwrapped_model.named_parameters() if p.grad is not None}
            )
            return _step(*args, **kwargs)

        trainer.optimizer.step = capture
        trainer.train()
        runs[fuse] = (grads, trainer.log_history[-1], calls["n"])
    (g_fused, log_fused, n_fused), (g_plain, log_plain, n_plain) = runs[True], runs[False]
    assert (n_plain, n_fused) == (3, 2)  # policy + reference + update forward  vs  reference + update
    assert g_fused.keys() == g_plain.keys() and len(g_plain) > 10
    for k in g_plain:
        scale = g_plain[k].abs().max().item()
        assert scale > 0 and (g_fused[k] - g_plain[k]).abs().max().item() <= 1e-4 * scale + 1e-9, k
    for key in ("objective/scores", "objective/kl", "policy/entropy", "loss/policy", "policy/grad_norm"):
        assert log_fused[key] == pytest.approx(log_plain[key], rel=1e-4, abs=1e-6), key
    assert log_fused["policy/approxkl"] == pytest.approx(0.0, abs=1e-6)  # the ratio is exactly 1, as sampled


def test_fused_policy_forward_only_when_exact(tokenizer, tmp_path):
    assert not make_trainer(tokenizer, tmp_path / "a", mini_batch_size=4, ppo_epochs=1).algorithm.fuses_policy_forward
    assert not make_trainer(tokenizer, tmp_path / "b", mini_batch_size=8, ppo_epochs=2).algorithm.fuses_policy_forward
    assert not make_trainer(
        tokenizer, tmp_path / "c", mini_batch_size=8, ppo_epochs=1, gradient_accumulation_steps=2
    ).algorithm.fuses_policy_forward
    assert not make_trainer(
        tokenizer, tmp_path / "d", mini_batch_size=8, ppo_epochs=1, disable_dropout=False
    ).algorithm.fuses_policy_forward
    assert make_trainer(tokenizer, tmp_path / "e", mini_batch_size=8, ppo_epochs=1).algorithm.fuses_policy_forward
