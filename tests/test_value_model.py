"""value_model: a separate critic (a model id/path, the run's reward model, or the policy's own weights — a second LoRA
adapter on a LoRA policy) instead of the value head. Every number is checked against the critic's own forward, done
by hand here."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import make_tokenizer, tiny_gpt2
from peft import IA3Config, LoraConfig
from test_hub import FakeHub
from test_trainer import PROMPTS, assert_toy_reward_rose, make_trainer, params, target_share
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from hfpg import AutoModelForCausalLMWithValueHead, ConfigError, PGConfig, TrainerCallback, ops
from hfpg.modeling import VALUE_HEAD_FILE
from hfpg.rewards.models import RewardModelReward
from hfpg.value_model import VALUE_MODEL_DIR, LoraValueModel

LORA = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, task_type="CAUSAL_LM")


def lora_policy(tokenizer):
    return AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(tokenizer), peft_config=LoraConfig(**LORA))


def save_classifier(tokenizer, path, num_labels=1, seed=3, **overrides):
    """A tiny GPT-2 sequence classifier (a "reward model") with a random, non-zero score head, saved with its
    tokenizer."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2, num_labels=num_labels)
    cfg.update(pad_token_id=tokenizer.pad_token_id, **overrides)
    model = GPT2ForSequenceClassification(GPT2Config(**cfg)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def hand_values(classifier, rollout) -> torch.Tensor:
    """The critic's values by hand: backbone -> score at every position, then the positions that predict each
    response token (``[P-1, P+T-1)``), zero on padding."""
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
    attn = torch.cat([rollout.prompt_mask, rollout.response_mask], 1).long()
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = classifier.transformer(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
        v = classifier.score(hidden).squeeze(-1).float()
    P, T = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    return torch.where(rollout.response_mask.bool(), v[:, P - 1 : P + T - 1], 0.0)


# ---- values, GAE and the value loss come from the critic ------------------------------------------------------------
def test_rollout_values_gae_and_value_loss_use_the_critic(tokenizer, tmp_path):
    rm = save_classifier(tokenizer, tmp_path / "rm")
    trainer = make_trainer(tokenizer, tmp_path, value_model=str(tmp_path / "rm"), ppo_epochs=1, mini_batch_size=8)
    rollout, _ = trainer.make_rollout([{"prompt": p} for p in PROMPTS * 2])
    expected = hand_values(rm, rollout)
    assert expected[rollout.response_mask.bool()].abs().min() > 0  # a non-zero head: values are not the value head's 0
    torch.testing.assert_close(rollout.values, expected, rtol=1e-5, atol=1e-6)
    # GAE from those values, by the brute-force sum of δ_t (γ=1, λ=0.95), independent of ops.gae_advantages
    cfg = trainer.config
    adv = trainer.algorithm.compute_advantages(rollout, rollout.scores, 0.01, trainer.accelerator)
    rewards, mask = adv["rewards"], rollout.response_mask
    B = mask.shape[0]
    for b in range(B):
        n = int(mask[b].sum())
        v = [*expected[b, :n].tolist(), 0.0]
        delta = [rewards[b, t].item() + cfg.gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            a = sum((cfg.gamma * cfg.lam) ** (k - t) * delta[k] for k in range(t, n))
            assert adv["returns"][b, t].item() == pytest.approx(a + v[t], rel=1e-4, abs=1e-5)
    # the value loss of the single minibatch: V = the critic's values (ratio 1, no clipping yet)
    metrics = trainer.algorithm.update(
        trainer.model,
        trainer.optimizer,
        trainer.scheduler,
        trainer.accelerator,
        rollout,
        adv["advantages"],
        adv["returns"],
        0.01,
    )
    value_loss = ops.masked_mean(0.5 * (expected - adv["returns"]) ** 2, rollout.loss_mask)
    assert metrics["loss/value"] == pytest.approx(float(value_loss), rel=1e-4)
    assert metrics["value/grad_norm"] > 0
    # the critic moved, and the policy's value head is frozen and unused
    moved = trainer.accelerator.unwrap_model(trainer.critic.model).model
    assert not torch.equal(moved.score.weight, rm.score.weight)
    assert not trainer.unwrapped_model.v_head.summary.weight.requires_grad
    assert trainer.unwrapped_model.v_head.summary.weight.abs().sum() == 0


def test_the_fused_policy_forward_takes_values_from_the_critic(tokenizer, tmp_path):
    """REINFORCE with a value baseline, one minibatch: the update's forward is fused; its values are the critic's."""
    save_classifier(tokenizer, tmp_path / "rm")
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        value_model=str(tmp_path / "rm"),
        algorithm="reinforce",
        advantage_estimator="returns",
        baseline="value",
        mini_batch_size=8,
        max_steps=1,
    )
    assert trainer.algorithm.fuses_policy_forward
    seen = {}
    original = trainer.algorithm.training_forward

    def spy(model, rollout):
        critic = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.critic.model).model)  # before the update
        out = original(model, rollout)
        seen["expected"], seen["values"] = hand_values(critic, rollout), rollout.values.clone()
        return out

    trainer.algorithm.training_forward = spy
    trainer.train()
    torch.testing.assert_close(seen["values"], seen["expected"], rtol=1e-5, atol=1e-6)


# ---- warm-up: only the critic trains ---------------------------------------------------------------------------------
class Snapshots(TrainerCallback):
    def __init__(self):
        self.policy, self.critic = {}, {}

    def on_step_end(self, trainer, step, metrics):
        self.policy[step] = params(trainer.unwrapped_model)
        self.critic[step] = params(trainer.accelerator.unwrap_model(trainer.critic.model))


@pytest.mark.parametrize("algorithm", ["ppo", "trpo"])
def test_warmup_steps_leave_the_policy_bit_identical(algorithm, tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer, tmp_path, value_model="policy", value_model_warmup_steps=2, max_steps=3, algorithm=algorithm
    )
    start_policy = params(trainer.unwrapped_model)
    start_critic = params(trainer.accelerator.unwrap_model(trainer.critic.model))
    snaps = Snapshots()
    trainer.callbacks.append(snaps)
    trainer.train()
    for step in (1, 2):
        for k, v in start_policy.items():
            assert torch.equal(snaps.policy[step][k], v), (step, k)
    assert any(not torch.equal(snaps.critic[1][k], v) for k, v in start_critic.items())  # the critic trained
    assert any(not torch.equal(snaps.policy[3][k], start_policy[k]) for k in start_policy)  # then the policy did
    assert [r.get("policy/frozen", 0.0) for r in trainer.log_history] == [1.0, 1.0, 0.0]


# ---- reward_model: a copy of the run's reward model ------------------------------------------------------------------
def test_reward_model_initialisation_copies_it_and_leaves_it_frozen(tokenizer, tmp_path):
    rm = save_classifier(tokenizer, tmp_path / "rm", seed=5)
    rewards = [
        {"name": "reward_model", "kwargs": {"model": str(tmp_path / "rm")}},
        {"name": "test_trainer:length_reward", "weight": 0.1},
    ]
    trainer = make_trainer(tokenizer, tmp_path, value_model="reward_model", rewards=rewards, max_steps=2)
    critic = trainer.accelerator.unwrap_model(trainer.critic.model).model
    for k, v in rm.state_dict().items():
        assert torch.equal(critic.state_dict()[k], v), k
    trainer.train()
    reward_model = next(
        getattr(r, "fn", r) for r in trainer.reward_fn.rewards if isinstance(getattr(r, "fn", r), RewardModelReward)
    )
    assert all(not p.requires_grad for p in reward_model.model.parameters())
    for k, v in rm.state_dict().items():
        assert torch.equal(reward_model.model.state_dict()[k].cpu(), v), k  # the reward model did not move
    assert any(not torch.equal(critic.state_dict()[k], v) for k, v in rm.state_dict().items())  # the critic did
    assert not set(p.data_ptr() for p in critic.parameters()) & set(
        p.data_ptr() for p in reward_model.model.parameters()
    )


def test_reward_model_needs_exactly_one_learned_reward_model(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match=r"no learned reward model.*declare exactly one"):
        make_trainer(tokenizer, tmp_path, value_model="reward_model")


# ---- policy: a full copy, or a second LoRA adapter on the same base --------------------------------------------------
def test_policy_critic_without_lora_is_a_separate_copy_of_the_policy_weights(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, value_model="policy")
    critic = trainer.accelerator.unwrap_model(trainer.critic.model).model
    policy_base = trainer.unwrapped_model.pretrained_model.transformer
    for k, v in policy_base.state_dict().items():
        assert torch.equal(critic.transformer.state_dict()[k], v), k
    assert not set(p.data_ptr() for p in critic.parameters()) & set(
        p.data_ptr() for p in trainer.unwrapped_model.parameters()
    )
    assert critic.score.weight.abs().sum() == 0  # a fresh head starts at 0, like the value head


def test_lora_policy_critic_shares_the_base_and_never_touches_the_policy_adapter(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, model=lora_policy(tokenizer), value_model="policy", max_steps=2)
    critic = trainer.accelerator.unwrap_model(trainer.critic.model)
    assert isinstance(critic, LoraValueModel)
    peft = trainer.unwrapped_model.pretrained_model
    assert critic.peft_model is peft and set(peft.peft_config) == {"default", "critic"}
    # one copy of the base: every critic parameter but its head is a tensor of the policy's PEFT model
    policy_ptrs = {p.data_ptr() for p in trainer.unwrapped_model.parameters()}
    own = [n for n, p in critic.named_parameters() if p.data_ptr() not in policy_ptrs]
    assert own == ["score.weight"]
    base_ids = {id(p) for n, p in peft.named_parameters() if "lora_" not in n}
    assert not base_ids & {id(p) for p in critic.parameters()}  # the base weights are not critic parameters
    assert not {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} & critic.shared_parameter_ids
    critic_b = {n: p.detach().clone() for n, p in peft.named_parameters() if "lora_B.critic" in n}
    assert all(v.abs().sum() == 0 for v in critic_b.values())
    trainer.train()
    after = dict(peft.named_parameters())
    assert any(after[n].abs().sum() > 0 for n in critic_b)  # the critic's adapter trained
    assert peft.active_adapter == "default"
    # the policy's outputs are those of the policy adapter alone: the same model without the critic adapter
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        with_critic = peft(input_ids=ids).logits
        alone = copy.deepcopy(peft)
        alone.delete_adapter("critic")
        without = alone(input_ids=ids).logits
    assert torch.equal(with_critic, without)
    # saved: only the policy adapter at the top, the critic as a plain sequence classifier in value_model/
    out = trainer.save_model(str(tmp_path / "final"))
    assert not os.path.exists(os.path.join(out, "critic"))
    assert not os.path.exists(os.path.join(out, VALUE_HEAD_FILE))
    loaded = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, VALUE_MODEL_DIR)).eval()
    rollout, _ = trainer.make_rollout([{"prompt": p} for p in PROMPTS])
    torch.testing.assert_close(hand_values(loaded, rollout), rollout.values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "peft_config, match",
    [
        (IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], task_type="CAUSAL_LM"), "IA3"),
        (LoraConfig(**LORA, use_dora=True), "DoRA"),
    ],
    ids=["ia3", "dora"],
)
def test_policy_critic_refuses_other_peft_methods(peft_config, match, tokenizer, tmp_path):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(tokenizer), peft_config=peft_config)
    with pytest.raises(ConfigError, match=match):
        make_trainer(tokenizer, tmp_path, model=model, value_model="policy")


# ---- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            dict(
                algorithm="reinforce", advantage_estimator="returns", baseline="leave_one_out", num_samples_per_prompt=2
            ),
            "uses none",
        ),
        (dict(algorithm="reinforce", advantage_estimator="returns", baseline="none"), "uses none"),
        (dict(value_model=None, value_model_warmup_steps=1), "apply to a separate critic"),
        (dict(value_model_warmup_steps=5), "never be trained"),
        (dict(replay_buffer_size=8, replay_batch_size=4), "replay"),
        (dict(mixed_precision="fp16"), "fp16"),
        (dict(value_model_learning_rate=0.0), "must be > 0"),
    ],
)
def test_config_refusals(overrides, match):
    kw = {"value_model": "policy", "max_steps": 5, **overrides}
    with pytest.raises(ConfigError, match=match):
        PGConfig(**kw)


def test_a_critic_with_another_vocabulary_or_tokenizer_or_head_is_refused(tokenizer, tmp_path):
    save_classifier(tokenizer, tmp_path / "big", vocab_size=len(tokenizer) + 7)
    with pytest.raises(ConfigError, match=r"vocabulary has .* tokens.*policy's tokenizer"):
        make_trainer(tokenizer, tmp_path, value_model=str(tmp_path / "big"))
    other = make_tokenizer()
    other.add_tokens(["zzz"])  # another vocabulary, then a model of the policy's size saved with it
    model = save_classifier(tokenizer, tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    del model
    with pytest.raises(ConfigError, match="tokenizer differs"):
        make_trainer(tokenizer, tmp_path, value_model=str(tmp_path / "other"))
    save_classifier(tokenizer, tmp_path / "two", num_labels=2)
    with pytest.raises(ConfigError, match="num_labels=2"):
        make_trainer(tokenizer, tmp_path, value_model=str(tmp_path / "two"))


def test_a_causal_lm_checkpoint_gets_its_backbone_and_a_zero_head(tokenizer, tmp_path):
    lm = tiny_gpt2(tokenizer, seed=7)
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    trainer = make_trainer(tokenizer, tmp_path, value_model=str(tmp_path / "lm"))
    critic = trainer.accelerator.unwrap_model(trainer.critic.model).model
    for k, v in lm.transformer.state_dict().items():
        assert torch.equal(critic.transformer.state_dict()[k], v), k
    assert critic.score.weight.abs().sum() == 0


# ---- saved, pushed -------------------------------------------------------------------------------------------------
def test_the_critic_is_saved_beside_the_policy_and_pushed_with_it(tokenizer, tmp_path, monkeypatch):
    trainer = make_trainer(tokenizer, tmp_path, value_model="policy", max_steps=1)
    trainer.train()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtoken1234567890abcdef")
    hub = FakeHub().install(monkeypatch)
    trainer.push_to_hub("me/tiny-critic")
    folder = os.path.join(trainer.config.output_dir, "final")
    critic = trainer.accelerator.unwrap_model(trainer.critic.model).model
    loaded = AutoModelForSequenceClassification.from_pretrained(os.path.join(folder, VALUE_MODEL_DIR))
    for k, v in critic.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        rel = f"{VALUE_MODEL_DIR}/{name}"
        assert hub.files[rel] == Path(folder, rel).read_bytes()
    assert VALUE_HEAD_FILE not in hub.files  # no unused value head


# ---- it learns -------------------------------------------------------------------------------------------------------
def test_ppo_with_a_value_model_raises_the_toy_reward(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        value_model="policy",
        value_model_learning_rate=3e-3,
        max_steps=30,
        rollout_batch_size=32,
        mini_batch_size=16,
        ppo_epochs=4,
        max_new_tokens=8,
        reward=target_share(tokenizer),
    )
    trainer.train()
    assert_toy_reward_rose(trainer)
    assert all(r["value/grad_norm"] > 0 for r in trainer.log_history)
