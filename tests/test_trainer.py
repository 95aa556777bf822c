"""PGTrainer end to end on a tiny GPT-2: learning, the PPO invariants of docs/design.md, resume, metrics, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import small_run, tiny_gpt2
from peft import LoraConfig

from hfpg import AutoModelForCausalLMWithValueHead, PGConfig, PGTrainer, TrainerCallback
from hfpg.algorithms.ppo import PPO
from hfpg.data import DataError
from hfpg.rewards import RewardError

PROMPTS = ["the cat", "a good day", "hello world", "policy gradient"]
REQUIRED_METRICS = [
    "objective/kl",
    "objective/kl_coef",
    "objective/scores",
    "objective/rlhf_reward",
    "policy/approxkl",
    "policy/clipfrac",
    "policy/entropy",
    "loss/policy",
    "loss/value",
    "value/explained_variance",
    "time/rollout",
    "time/update",
    "tokens_per_second",
]


def set_share(tokenizer, n: int = 32):
    """A denser toy reward: the share of completion tokens among the first ``n`` vocabulary ids."""

    def set_share(prompts, completions, **columns):
        out = []
        for c in completions:
            ids = tokenizer(c)["input_ids"]
            out.append(sum(i < n for i in ids) / max(len(ids), 1))
        return out

    return set_share


def target_share(tokenizer, token: str = "Ġgood"):
    """Toy reward: the share of completion tokens that are ``token``."""
    target = tokenizer.convert_tokens_to_ids(token)

    def target_share(prompts, completions, **columns):
        out = []
        for c in completions:
            ids = tokenizer(c)["input_ids"]
            out.append(sum(i == target for i in ids) / max(len(ids), 1))
        return out

    return target_share


def assert_toy_reward_rose(trainer) -> None:
    """The learning tests' check: the mean score of the first 3 steps is near a random policy's (the target token is
    about 1/320 of the samples), the mean of the last 3 above 0.5."""
    scores = [r["objective/scores"] for r in trainer.log_history]
    start, end = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert start < 0.05 and end > 0.5, scores


def length_reward(prompts, completions, **columns):
    """A dense reward (every sample differs), so even a zero-initialised adapter gets a gradient."""
    return [len(c) / 10 for c in completions]


def make_trainer(tokenizer, tmp_path, model=None, reward=None, dataset=None, **overrides):
    defaults = dict(rollout_batch_size=8, ppo_epochs=2, max_new_tokens=6, kl_coef=0.01)
    cfg = small_run(tmp_path, **{**defaults, **overrides})
    return PGTrainer(
        model if model is not None else tiny_gpt2(tokenizer),
        tokenizer,
        PGConfig(**cfg),
        train_dataset=dataset if dataset is not None else [{"prompt": p} for p in PROMPTS],
        reward_fn=reward if reward is not None else (None if cfg.get("rewards") else length_reward),
    )


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        trainer.should_stop = step >= self.step


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- learning ------------------------------------------------------------------------------------------------------
def test_ppo_raises_a_toy_reward_far_above_its_start(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        max_steps=40,
        rollout_batch_size=32,
        mini_batch_size=16,
        ppo_epochs=4,
        max_new_tokens=8,
        reward=target_share(tokenizer),
    )
    trainer.train()
    assert_toy_reward_rose(trainer)
    assert all(math.isfinite(r["objective/kl"]) for r in trainer.log_history)
    assert trainer.log_history[-1]["objective/kl"] > 0  # the policy did move away from the reference


# ---- the implementation details of docs/design.md --------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_minibatch_ratio_is_one_and_approx_kl_zero(temperature, tokenizer, tmp_path):
    """Detail 3 + 4: one epoch, one minibatch => every logged policy stat comes from the first minibatch. A model built
    with dropout 0.3 and temperature 0.7 must still give ratio 1 (dropout off, temperature in old/new logprobs). The
    rollout's separate no-grad forward gives the old logprobs (fused, they would be the update's own: 1 by design)."""
    model = tiny_gpt2(tokenizer, resid_pdrop=0.3, attn_pdrop=0.3, embd_pdrop=0.3)
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        model=model,
        ppo_epochs=1,
        mini_batch_size=8,
        temperature=temperature,
        max_steps=1,
        fuse_policy_forward=False,
    )
    assert not trainer.algorithm.fuses_policy_forward
    m = trainer.train()
    assert abs(m["policy/ratio"] - 1.0) < 1e-6
    assert m["policy/approxkl"] < 1e-9
    assert m["policy/clipfrac"] == 0.0
    assert m["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update


def test_ratio_is_not_one_when_dropout_stays_on(tokenizer, tmp_path):
    """Negative control for detail 4: with dropout left on, the first minibatch's ratio is off 1."""
    model = tiny_gpt2(tokenizer, resid_pdrop=0.3, attn_pdrop=0.3, embd_pdrop=0.3)
    trainer = make_trainer(
        tokenizer, tmp_path, model=model, ppo_epochs=1, mini_batch_size=8, max_steps=1, disable_dropout=False
    )
    m = trainer.train()
    assert m["policy/approxkl"] > 1e-4


def test_reference_model_never_changes(tokenizer, tmp_path):
    """Detail 15: the policy moves, the frozen reference copy does not."""
    trainer = make_trainer(tokenizer, tmp_path, max_steps=3)
    ref_before, policy_before = params(trainer.ref_model), params(trainer.unwrapped_model)
    trainer.train()
    assert any(not torch.equal(policy_before[k], v) for k, v in params(trainer.unwrapped_model).items())
    for k, v in params(trainer.ref_model).items():
        assert torch.equal(ref_before[k], v), k
    assert not trainer.ref_model.training


def test_lora_policy_trains_adapters_and_value_head_only(tokenizer, tmp_path):
    """Detail 15 for PEFT: the reference is the base with adapters disabled; base weights never change."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.1, task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_gpt2(tokenizer), peft_config=lora)
    probe = tokenizer(["the cat sat on"], return_tensors="pt")
    base_logits = model.base_model(**probe).logits.detach()  # adapters start at zero: policy == base
    trainer = make_trainer(tokenizer, tmp_path, model=model, max_steps=3, learning_rate=5e-2, reward=length_reward)
    assert trainer.ref_model is None
    before = params(trainer.unwrapped_model)
    trainer.train()
    after = params(trainer.unwrapped_model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k or k.startswith("v_head") for k in changed), changed
    assert any(k.startswith("v_head") for k in changed)
    with torch.no_grad(), trainer.unwrapped_model.disable_adapter():
        ref_logits = trainer.unwrapped_model.pretrained_model(**probe).logits
    torch.testing.assert_close(ref_logits, base_logits)
    assert not torch.allclose(trainer.unwrapped_model(**probe).logits, base_logits)


def test_each_epoch_draws_a_fresh_permutation_of_the_batch(tokenizer, tmp_path, monkeypatch):
    """Detail 13: every epoch visits each sequence once, in a new order."""
    seen = []
    original = PPO._micro_step

    def spy(self, model, accelerator, rollout, advantages, returns, kl_coef, b_mask, b_weight, idx, *args):
        seen.append(idx.tolist())
        return original(self, model, accelerator, rollout, advantages, returns, kl_coef, b_mask, b_weight, idx, *args)

    monkeypatch.setattr(PPO, "_micro_step", spy)
    trainer = make_trainer(tokenizer, tmp_path, max_steps=1, rollout_batch_size=8, mini_batch_size=2, ppo_epochs=3)
    trainer.train()
    epochs = [[row for batch in seen[i : i + 4] for row in batch] for i in range(0, 12, 4)]
    assert len(seen) == 12 and all(sorted(e) == list(range(8)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3


@pytest.mark.parametrize(
    "loss",
    [
        {},
        dict(loss_type="grpo", mask_truncated_completions=True, stop_token_ids=list(range(60, 100))),  # some stop
        dict(loss_type="dr_grpo", importance_sampling_level="sequence"),
    ],
    ids=["dapo", "grpo-masked", "dr_grpo-gspo"],
)
def test_gradient_accumulation_gives_the_same_update(loss, tokenizer, tmp_path):
    """Detail 13: a minibatch of 8 in one piece or as 4 micro-batches of 2 gives the same weights (each loss_type)."""
    results = []
    for accum in (1, 4):
        trainer = make_trainer(
            tokenizer,
            tmp_path / f"ga{accum}",
            max_steps=2,
            rollout_batch_size=16,
            mini_batch_size=8,
            gradient_accumulation_steps=accum,
            learning_rate=1e-3,
            **loss,
        )
        trainer.train()
        results.append(params(trainer.unwrapped_model))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=2e-6)
    init = params(AutoModelForCausalLMWithValueHead(tiny_gpt2(tokenizer)))
    moved = sum(not torch.allclose(init[k], results[0][k]) for k in init)
    assert moved > 5  # the update is not trivially empty


def test_batch_sizes_that_do_not_divide_fail_before_any_model_work(tokenizer, tmp_path):
    from hfpg import ConfigError

    with pytest.raises(ConfigError, match="mini_batch_size=4 must be a multiple of"):
        make_trainer(tokenizer, tmp_path, gradient_accumulation_steps=3)
    with pytest.raises(ConfigError, match="not a multiple of mini_batch_size"):
        PGConfig(rollout_batch_size=10, mini_batch_size=4)


def test_missing_eos_penalty_hits_only_completions_without_a_stop(tokenizer, tmp_path):
    """Detail 5: the penalty applies to completions that ran to max_new_tokens."""

    def zero(prompts, completions, **kw):
        return [0.0] * len(completions)

    model = tiny_gpt2(tokenizer)
    # EOS can never be sampled: every completion runs out of tokens
    model.get_output_embeddings().register_forward_hook(
        lambda m, i, o: o.index_fill(-1, torch.tensor([tokenizer.eos_token_id]), -1e4)
    )
    trainer = make_trainer(tokenizer, tmp_path, model=model, reward=zero, max_steps=1, missing_eos_penalty=2.5)
    m = trainer.train()
    assert m["completions/no_stop_fraction"] == 1.0
    assert m["objective/scores"] == 0.0
    assert m["objective/scores_shaped"] == -2.5


def test_adaptive_kl_coefficient_moves_and_is_logged(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=3, adaptive_kl=True, kl_target=100.0, kl_horizon=8)
    trainer.train()
    coefs = [r["objective/kl_coef"] for r in trainer.log_history]
    assert coefs[0] == 0.01
    # KL far below target: err = -0.2 each step, β ← β·(1 - 0.2·8/8)
    assert coefs[1] == pytest.approx(0.01 * 0.8) and coefs[2] == pytest.approx(0.01 * 0.8 * 0.8)


def test_early_stop_when_approx_kl_exceeds_the_target(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=2, ppo_epochs=4, target_approx_kl=1e-12, learning_rate=1e-2)
    trainer.train()
    last = trainer.log_history[-1]
    assert last["policy/early_stopped"] == 1.0
    assert last["policy/optimizer_steps"] < 4 * 2


def test_entropy_bonus_keeps_the_policy_more_random(tokenizer, tmp_path):
    ent = {}
    for coef in (0.0, 1.0):
        trainer = make_trainer(
            tokenizer,
            tmp_path / str(coef),
            max_steps=15,
            rollout_batch_size=16,
            mini_batch_size=8,
            ent_coef=coef,
            max_new_tokens=6,
            reward=set_share(tokenizer),
        )
        trainer.train()
        ent[coef] = trainer.log_history[-1]["policy/entropy"]
    assert ent[1.0] > ent[0.0] + 0.5, ent


def test_linear_schedule_decays_the_learning_rate(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=2, ppo_epochs=1, mini_batch_size=8, learning_rate=1e-3)
    trainer.train()
    lrs = [r["lr"] for r in trainer.log_history]
    assert lrs == pytest.approx([5e-4, 0.0])


# ---- resume ----------------------------------------------------------------------------------------------------------
def test_resumed_run_continues_exactly_like_an_uninterrupted_one(tokenizer, tmp_path):
    """Detail 14: model, optimizer, scheduler, KL controller, score statistics, sampler and RNG are all restored."""
    kw = dict(
        max_steps=4,
        save_steps=2,
        adaptive_kl=True,
        kl_target=0.5,
        kl_horizon=50,
        score_scaling="running_std",
        dataset=[{"prompt": p} for p in PROMPTS * 3],
    )
    straight = make_trainer(tokenizer, tmp_path / "a", **kw)
    straight.train()
    interrupted = make_trainer(tokenizer, tmp_path / "b", **kw)
    interrupted.callbacks.append(StopAt(2))  # the run dies after step 2
    interrupted.train()
    assert interrupted.global_step == 2
    assert (tmp_path / "b" / "run" / "checkpoint-2" / "trainer_state.json").is_file()
    resumed = make_trainer(tokenizer, tmp_path / "b", **kw)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.global_step == 4 and len(resumed.log_history) == 2
    a, b = params(straight.unwrapped_model), params(resumed.unwrapped_model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for ra, rb in zip(straight.log_history[2:], resumed.log_history):
        assert ra["step"] == rb["step"]
        for key in ("objective/scores", "objective/kl", "objective/kl_coef", "loss/policy", "lr"):
            assert ra[key] == rb[key], key


def test_resume_from_a_folder_that_is_not_a_checkpoint_is_a_clear_error(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(FileNotFoundError, match="not an hfpg checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path))


def test_save_total_limit_keeps_the_newest_checkpoints(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=3, save_steps=1, save_total_limit=2)
    trainer.train()
    names = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert names == ["checkpoint-2", "checkpoint-3"]


# ---- logging, evaluation, saving, callbacks ------------------------------------------------------------------------
def test_metrics_reach_jsonl_tensorboard_and_history(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, report_to=["tensorboard"], max_steps=2)
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for name in REQUIRED_METRICS:
        assert name in lines[-1], name
        assert name in trainer.log_history[-1]
    events = list((tmp_path / "run" / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "objective/kl" in acc.Tags()["scalars"]


def test_reward_receives_the_other_dataset_columns(tokenizer, tmp_path):
    seen = {}

    def reward(prompts, completions, references, difficulty, **kw):
        seen.update(prompts=prompts, references=references, difficulty=difficulty)
        return [float(len(c)) for c in completions]

    data = [{"prompt": p, "references": [p.upper()], "difficulty": i} for i, p in enumerate(PROMPTS)]
    trainer = make_trainer(
        tokenizer, tmp_path, reward=reward, dataset=data, rollout_batch_size=4, mini_batch_size=4, max_steps=1
    )
    trainer.train()
    for p, ref, d in zip(seen["prompts"], seen["references"], seen["difficulty"]):
        assert ref == [p.upper()] and PROMPTS[d] == p


def test_evaluate_and_callbacks(tokenizer, tmp_path):
    events = []

    class Recorder(TrainerCallback):
        def on_train_begin(self, trainer):
            events.append("begin")

        def on_step_end(self, trainer, step, metrics):
            events.append(f"step{step}")
            if step == 2:
                trainer.should_stop = True

        def on_evaluate(self, trainer, step, metrics):
            events.append("eval")

        def on_train_end(self, trainer):
            events.append("end")

    trainer = make_trainer(tokenizer, tmp_path, max_steps=5, eval_steps=1)
    trainer.eval_dataset = trainer.train_dataset
    trainer.callbacks.append(Recorder())
    trainer.train()
    assert events == ["begin", "eval", "step1", "eval", "step2", "end"]  # stopped after step 2 of 5
    m = trainer.evaluate()
    assert m["eval/num_samples"] == len(PROMPTS)
    assert 0.0 <= m["eval/scores"] <= 1.0 and m["eval/completion_length"] > 0


def test_save_model_round_trips_policy_and_value_head(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=2)
    trainer.train()
    out = trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(out)
    trained = params(trainer.unwrapped_model)
    for k, v in params(loaded).items():
        assert torch.equal(trained[k], v), k
    assert torch.count_nonzero(loaded.v_head.summary.weight) > 0
    assert PGConfig.from_yaml(tmp_path / "final" / "hfpg_config.yaml").max_steps == 2


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_empty_dataset_and_missing_column_are_clear_errors(tokenizer, tmp_path):
    with pytest.raises(DataError, match="train_dataset is empty"):
        make_trainer(tokenizer, tmp_path, dataset={"prompt": []})
    with pytest.raises(DataError, match=r"has no column 'prompt'; its columns are \['text'\]"):
        make_trainer(tokenizer, tmp_path, dataset=[{"text": "x"}])


def test_prompt_longer_than_the_context_names_the_row(tokenizer, tmp_path):
    data = [{"prompt": p} for p in PROMPTS] + [{"prompt": "the cat sat on the mat " * 40}]
    with pytest.raises(DataError, match=r"train_dataset row 4: the prompt is \d+ tokens.*context of 128"):
        make_trainer(tokenizer, tmp_path, dataset=data)
    make_trainer(tokenizer, tmp_path, dataset=data, max_prompt_length=64)  # truncation makes it fit


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda n: [float("nan")] * n, r"reward function 'bad_reward' returned 8 non-finite value\(s\).*batch of 8"),
        (lambda n: [1.0] * (n - 1), r"reward function 'bad_reward' returned 7 values for a batch of 8 completions"),
        (lambda n: ["good"] * n, r"reward function 'bad_reward' returned a non-numeric value 'good'.*batch of 8"),
        (lambda n: "1.0", r"reward function 'bad_reward' returned str for a batch of 8"),
    ],
)
def test_bad_rewards_fail_before_any_optimizer_step(bad, message, tokenizer, tmp_path):
    def bad_reward(prompts, completions, **kw):
        return bad(len(completions))

    trainer = make_trainer(tokenizer, tmp_path, reward=bad_reward)
    before = params(trainer.unwrapped_model)
    with pytest.raises(RewardError, match=message):
        trainer.train()
    for k, v in params(trainer.unwrapped_model).items():
        assert torch.equal(before[k], v)
    assert not any(s["exp_avg"].abs().sum() for s in trainer.optimizer.state.values())


# ---- memory/speed options give the same numbers ----------------------------------------------------------------------
def test_chunked_rollout_forwards_match_one_big_forward(tokenizer, tmp_path):
    rollouts = []
    for chunk in (None, 3):  # 3 does not divide 8: the last chunk is short
        trainer = make_trainer(tokenizer, tmp_path / str(chunk), forward_batch_size=chunk)
        torch.manual_seed(0)
        rows = [{"prompt": p} for p in PROMPTS * 2]
        rollouts.append(trainer.make_rollout(rows)[0])
    a, b = rollouts
    assert torch.equal(a.response_ids, b.response_ids)
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_training_step(tokenizer, tmp_path):
    results = []
    for ckpt in (False, True):
        trainer = make_trainer(tokenizer, tmp_path / str(ckpt), max_steps=1, gradient_checkpointing=ckpt)
        assert trainer.unwrapped_model.is_gradient_checkpointing == ckpt
        trainer.train()
        results.append(params(trainer.unwrapped_model))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_trains_with_an_fp32_value_head(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=2, mixed_precision="bf16")
    m = trainer.train()
    assert all(math.isfinite(m[k]) for k in ("objective/kl", "loss/policy", "loss/value", "policy/approxkl"))
    assert trainer.unwrapped_model.v_head.summary.weight.dtype == torch.float32


def test_gradient_clipping_bounds_the_update(tokenizer, tmp_path):
    """With plain SGD at lr=1 and one optimizer step, the weights move by exactly the clipped gradient norm."""
    model = AutoModelForCausalLMWithValueHead(tiny_gpt2(tokenizer))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = PGTrainer(
        model,
        tokenizer,
        PGConfig(
            **small_run(
                tmp_path,
                output_dir=str(tmp_path),
                max_steps=1,
                rollout_batch_size=8,
                mini_batch_size=8,
                max_new_tokens=6,
                max_grad_norm=0.01,
                lr_scheduler_type="constant",
            )
        ),
        train_dataset=[{"prompt": p} for p in PROMPTS],
        reward_fn=length_reward,
        optimizers=(sgd, None),
    )
    m = trainer.train()
    after = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])
    assert m["policy/grad_norm"] > 0.01  # the raw gradient was larger than the bound
    assert (after - before).norm().item() == pytest.approx(0.01, rel=1e-3)


def test_score_shaping_whitening_running_std_and_clipping():
    """Stages 3-5 of hfpg.normalize, in order: missing-EOS penalty, scaling, clipping."""
    from hfpg.normalize import ScoreShaper

    shaper = ScoreShaper(PGConfig(score_scaling="whiten", missing_eos_penalty=1.0))
    shaped = shaper(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([True, True, True, False]))
    raw = torch.tensor([1.0, 2.0, 3.0, 5.0])  # the EOS penalty comes first
    torch.testing.assert_close(shaped, (raw - raw.mean()) / raw.std())

    shaper = ScoreShaper(PGConfig(score_scaling="running_std"))
    shaper(torch.tensor([0.0, 4.0]), torch.tensor([True, True]))
    shaped = shaper(torch.tensor([2.0, 2.0]), torch.tensor([True, True]))  # all four: mean 2, m2 8, var 8/3
    torch.testing.assert_close(shaped, torch.tensor([2.0, 2.0]) / (8 / 3) ** 0.5)  # divided, not centred

    shaper = ScoreShaper(PGConfig(score_clip=1.5))
    shaped = shaper(torch.tensor([-3.0, 0.5, 3.0]), torch.tensor([True, True, True]))
    torch.testing.assert_close(shaped, torch.tensor([-1.5, 0.5, 1.5]))


def test_trainer_loads_model_and_tokenizer_from_a_path(tokenizer, tmp_path):
    tiny_gpt2(tokenizer).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    trainer = PGTrainer(
        str(tmp_path / "m"),
        config=PGConfig(
            output_dir=str(tmp_path / "run"),
            max_steps=1,
            rollout_batch_size=4,
            mini_batch_size=4,
            max_new_tokens=4,
            report_to=[],
            disable_tqdm=True,
        ),
        train_dataset=[{"prompt": p} for p in PROMPTS],
        reward_fn=length_reward,
        ref_model=str(tmp_path / "m"),
    )
    assert isinstance(trainer.unwrapped_model, AutoModelForCausalLMWithValueHead)
    assert trainer.tokenizer.pad_token == "<pad>"
    assert trainer.train()["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the loaded reference equals the policy


def test_evaluate_checks_a_dataset_passed_to_it(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    with pytest.raises(DataError, match="evaluate\\(\\) needs an eval_dataset"):
        trainer.evaluate()
    with pytest.raises(DataError, match="eval_dataset has no column 'prompt'"):
        trainer.evaluate([{"question": "x"}])


def test_step_metrics_match_the_reference_maths():
    """The one-reduction formulas in hfpg.metrics agree with torch's variance and hand-computed means."""
    from hfpg.metrics import step_metrics
    from hfpg.rollout import Rollout

    torch.manual_seed(0)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    values, returns = torch.randn(2, 3) * mask, torch.randn(2, 3) * mask
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]])
    ids = torch.zeros(2, 3, dtype=torch.long)
    r = Rollout(
        ids[:, :1],
        torch.ones(2, 1),
        ids,
        mask,
        torch.tensor([True, False]),
        values=values,
        entropy=torch.ones(2, 3),
        scores=torch.tensor([1.0, 3.0]),
    )
    adv = {"kl": kl, "non_score_rewards": -0.5 * kl, "returns": returns}
    m = step_metrics(None, r, adv, torch.tensor([2.0, 4.0]), 0.5)
    want = 1 - (returns - values)[mask].var() / returns[mask].var()
    assert m["value/explained_variance"] == pytest.approx(want.item(), rel=1e-5)
    assert m["objective/kl"] == pytest.approx((0.6 + 0.9) / 2)
    assert m["objective/rlhf_reward"] == pytest.approx((2 - 0.3 + 4 - 0.45) / 2)
    assert m["objective/scores"] == 2.0 and m["objective/scores_shaped"] == 3.0
    assert m["completions/mean_length"] == 2.5 and m["completions/no_stop_fraction"] == 0.5


# ---- prompts as Python rows --------------------------------------------------------------------------------------
def test_rows_read_like_a_datasets_dataset():
    import datasets

    from hfpg.data import Rows, as_dataset

    rows = [{"prompt": "a", "ref": "x"}, {"prompt": "b", "ref": "y"}, {"prompt": "c", "ref": "z"}]
    ours, theirs = as_dataset(rows, "train_dataset"), datasets.Dataset.from_list(rows)
    assert isinstance(ours, Rows) and len(ours) == len(theirs) == 3
    assert ours.column_names == theirs.column_names
    assert ours["prompt"] == list(theirs["prompt"])
    assert ours[[2, 0]] == dict(theirs[[2, 0]]) and ours[1] == theirs[1] and ours[1:] == dict(theirs[1:])
    assert as_dataset({"prompt": ["a", "b"], "ref": ["x", "y"]}, "d")[[0, 1]] == {
        "prompt": ["a", "b"],
        "ref": ["x", "y"],
    }
    with pytest.raises(DataError, match="must have one length"):
        as_dataset({"prompt": ["a", "b"], "ref": ["x"]}, "train_dataset")
    assert as_dataset(theirs, "d") is theirs  # a datasets.Dataset is used as it is


def test_training_on_a_list_of_prompts_does_not_import_arrow(tmp_path):
    """A list of prompts stays a list: pyarrow/pandas (~80 MiB resident) are never imported."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "from conftest import make_tokenizer, tiny_gpt2\n"
        "from hfpg import PGConfig, PGTrainer\n"
        "tok = make_tokenizer()\n"
        f"cfg = PGConfig(output_dir={str(tmp_path)!r}, max_steps=1, rollout_batch_size=4, mini_batch_size=4,\n"
        "               max_new_tokens=4, report_to=[], disable_tqdm=True)\n"
        "PGTrainer(tiny_gpt2(tok), tok, cfg, train_dataset=[{'prompt': 'the cat', 'n': 1}] * 4,\n"
        "          reward_fn=lambda prompts, completions, **kw: [float(len(c)) for c in completions]).train()\n"
        "print(sorted(m for m in ('datasets', 'pyarrow', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
