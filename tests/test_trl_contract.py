"""TRL users' code unchanged: the reward call contract, None and async rewards, conversational prompts, TRL's argument
names, clip-higher, kl_coef 0 and factory rewards in YAML. (TRL's own functions run in tests/test_trl_compat.py.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from conftest import small_run, tiny_gpt2, tiny_llama

from hfpg import PGConfig, PGTrainer, ops
from hfpg.algorithms.advantages import compute_advantages
from hfpg.errors import ConfigError, DataError
from hfpg.recipe import DataSpec, load_prompts
from hfpg.report import SampleLogger
from hfpg.rewards import CombinedReward, LengthPenalty, RewardError
from hfpg.rewards.registry import build_reward, spec_problems
from hfpg.rollout import Rollout

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if shout %}LOUD {% endif %}{% endif %}"
)
PROMPTS = ["the cat sat", "a good day", "hello world", "policy gradient"]


def chat_tokenizer(tokenizer):
    tokenizer.chat_template = CHAT
    return tokenizer


def conversations(n: int = 4) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": PROMPTS[i % 4]}],
            "solution": str(i),
            "task": "math" if i % 2 else "code",
        }
        for i in range(n)
    ]


def trainer_for(tokenizer, tmp_path, reward, dataset=None, model=None, **overrides):
    return PGTrainer(
        model if model is not None else tiny_gpt2(tokenizer),
        processing_class=tokenizer,
        args=PGConfig(**small_run(tmp_path, **{"max_steps": 1, "max_new_tokens": 5, "kl_coef": 0.01, **overrides})),
        train_dataset=dataset
        if dataset is not None
        else [{"prompt": p, "solution": str(i)} for i, p in enumerate(PROMPTS)],
        reward_funcs=reward,
    )


# ---- the keyword contract ---------------------------------------------------------------------------------------
def test_rewards_receive_trls_keywords_and_completion_ids_exactly_as_sampled(tokenizer, tmp_path):
    seen = {}

    def spy(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **kwargs):
        seen.update(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            step=trainer_state.global_step,
            max_steps=trainer_state.max_steps,
            history=len(trainer_state.log_history),
            columns=sorted(kwargs),
        )
        log_metric("share_long", sum(len(c) > 3 for c in completions) / len(completions))
        log_extra("length_chars", [len(c) for c in completions])
        return [float(len(ids)) for ids in completion_ids]

    trainer = trainer_for(tokenizer, tmp_path, spy, max_steps=2)
    trainer.callbacks.append(SampleLogger(str(tmp_path / "samples.jsonl"), every=1, num=4))
    metrics = trainer.train()
    r = trainer.last_rollout
    want_ids = [ids[m].tolist() for ids, m in zip(r.response_ids, r.response_mask)]
    assert seen["completion_ids"] == want_ids  # the sampled ids, not a re-tokenisation of the text
    assert seen["completions"] == r.completions and seen["prompts"] == r.prompts
    assert set(seen["prompts"]) <= set(PROMPTS)
    assert seen["step"] == 1 and seen["max_steps"] == 2 and seen["history"] == 1  # step 1 logged before step 2
    assert seen["columns"] == ["solution"]
    assert metrics["objective/scores"] == pytest.approx(sum(map(len, want_ids)) / 4)
    assert metrics["reward/share_long"] == pytest.approx(sum(len(c) > 3 for c in r.completions) / 4)
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [row["length_chars"] for row in rows[-4:]] == [len(c) for c in r.completions]


def test_a_function_without_kwargs_gets_only_what_its_signature_names(tokenizer, tmp_path):
    calls = []

    def by_ids(completions_ids):  # the spelling of TRL's documentation example
        calls.append(completions_ids)
        return [float(len(x)) for x in completions_ids]

    def by_solution(completions, solution):
        return [float(c.count(s)) for c, s in zip(completions, solution)]

    trainer_for(tokenizer, tmp_path, [by_ids, by_solution]).train()
    assert len(calls) == 1 and all(isinstance(i, int) for ids in calls[0] for i in ids)


def test_a_signature_hfpg_cannot_satisfy_fails_before_the_model_loads(tokenizer, tmp_path, monkeypatch):
    def needs_answer(completions, answer):
        return [0.0] * len(completions)

    monkeypatch.setattr("hfpg.trainer.with_value_head", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(RewardError, match=r"'needs_answer'.*needs 'answer'.*columns \['solution'\]"):
        trainer_for(tokenizer, tmp_path, needs_answer)


def test_trl_argument_names_and_weighted_lists(tokenizer, tmp_path):
    def one(completions, **kw):
        return [1.0] * len(completions)

    def two(completions, **kw):
        return [2.0] * len(completions)

    trainer = PGTrainer(
        tiny_gpt2(tokenizer),
        processing_class=tokenizer,
        args={
            "output_dir": str(tmp_path),
            "max_steps": 1,
            "rollout_batch_size": 4,
            "mini_batch_size": 4,
            "report_to": [],
            "disable_tqdm": True,
            "max_new_tokens": 4,
        },
        reward_funcs=[one, two],
        reward_weights=[1.0, 0.5],
        train_dataset=[{"prompt": p} for p in PROMPTS],
    )
    assert trainer.train()["objective/scores"] == pytest.approx(2.0)
    assert trainer.reward_fn.names == ["one", "two"]
    with pytest.raises(ConfigError, match="2 weights for 1 reward"):
        trainer_for(tokenizer, tmp_path, one, reward_weights=[1.0, 2.0])
    with pytest.raises(TypeError, match="reward_funcs is TRL's name"):
        PGTrainer(tiny_gpt2(tokenizer), tokenizer, reward_fn=one, reward_funcs=two, train_dataset=[{"prompt": "a"}])


# ---- None: not applicable -----------------------------------------------------------------------------------------
def test_none_parts_are_left_out_of_the_weighted_sum_by_trls_rule():
    def f1(completions, **kw):
        return [1.0, None, 3.0, None]

    def f2(completions, **kw):
        return [None, 2.0, 5.0, None]

    reward = CombinedReward([(f1, 1.0), (f2, 0.5)])
    assert reward(["p"] * 4, ["a", "b", "c", "d"]) == [1.0, 1.0, 5.5, None]
    assert torch.isnan(reward.last_components["f1"]).tolist() == [False, True, False, True]
    # batch normalisation counts only the samples a part scored: f1's z-scores of [1, 3] are ∓1/√2 · √2 = ∓0.7071
    normed = CombinedReward([(f1, 1.0)], normalize="batch")(["p"] * 4, list("abcd"))
    assert normed[0] == pytest.approx(-1 / 2**0.5, rel=1e-5) and normed[2] == pytest.approx(1 / 2**0.5, rel=1e-5)
    assert normed[1] is None and normed[3] is None


def test_unscorable_samples_stay_out_of_baselines_and_get_advantage_zero():
    cfg = PGConfig(
        advantage_estimator="returns",
        baseline="group_norm",
        num_samples_per_prompt=4,
        kl_coef=0.0,
        whiten_advantages=False,
        rollout_batch_size=8,
        mini_batch_size=8,
    )
    B, T = 8, 3
    r = Rollout(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long),
        prompt_mask=torch.ones(B, 1, dtype=torch.long),
        response_ids=torch.zeros(B, T, dtype=torch.long),
        response_mask=torch.ones(B, T, dtype=torch.bool),
        has_stop=torch.ones(B, dtype=torch.bool),
        logprobs=torch.zeros(B, T),
        scorable=torch.tensor([True, True, True, False, True, True, False, False]),
    )
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 8.0, 0.0, 0.0])
    adv = compute_advantages(r, scores, 0.0, cfg)["advantages"][:, 0]
    # group 1: scored [1, 2, 6] -> mean 3, std √7; group 2: [4, 8] -> mean 6, std √8
    want = [(1 - 3) / 7**0.5, (2 - 3) / 7**0.5, (6 - 3) / 7**0.5, 0.0, (4 - 6) / 8**0.5, (8 - 6) / 8**0.5, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(want, abs=1e-5)
    loo = ops.leave_one_out_baseline(scores, 4, r.scorable)
    assert loo.tolist()[:3] == pytest.approx([4.0, 3.5, 1.5]) and loo[4].item() == 8.0 and loo[5].item() == 4.0


def test_a_batch_no_reward_applies_to_moves_no_weight(tokenizer, tmp_path):
    def code_only(completions, task, **kw):
        return [1.0 if t == "code" else None for t in task]

    rows = [{"prompt": p, "task": "math"} for p in PROMPTS]
    trainer = trainer_for(tokenizer, tmp_path, code_only, dataset=rows, ent_coef=0.1, kl_penalty="loss")
    before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    metrics = trainer.train()
    assert metrics["objective/unscorable_fraction"] == 1.0
    after = trainer.unwrapped_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no gradient from value, entropy or KL terms

    half = [{"prompt": p, "task": "math" if i % 2 else "code"} for i, p in enumerate(PROMPTS)]
    trainer = trainer_for(tokenizer, tmp_path / "half", code_only, dataset=half, num_samples_per_prompt=1)
    metrics = trainer.train()
    assert metrics["objective/unscorable_fraction"] == 0.5 and metrics["objective/scores"] == 1.0


# ---- async rewards --------------------------------------------------------------------------------------------------
def test_async_rewards_are_awaited_concurrently_even_inside_a_running_loop():
    first, second = {}, {}

    async def ping(completions, **kw):  # waits for pong's event: completes only if both run at once
        first["event"] = asyncio.Event()
        while "event" not in second:
            await asyncio.sleep(0.001)
        second["event"].set()
        await asyncio.wait_for(first["event"].wait(), timeout=10)
        return [1.0] * len(completions)

    async def pong(completions, **kw):
        second["event"] = asyncio.Event()
        while "event" not in first:
            await asyncio.sleep(0.001)
        first["event"].set()
        await asyncio.wait_for(second["event"].wait(), timeout=10)
        return [2.0] * len(completions)

    reward = CombinedReward([(ping, 1.0), (pong, 1.0)])

    async def from_a_notebook():  # a caller already inside an event loop (Jupyter)
        return reward(["p", "q"], ["a", "b"])

    assert asyncio.run(from_a_notebook()) == [3.0, 3.0]


# ---- conversational data ----------------------------------------------------------------------------------------
def test_conversational_prompts_are_rendered_and_rewards_get_messages(tokenizer, tmp_path):
    tok = chat_tokenizer(tokenizer)
    seen = {}

    def trl_style(prompts, completions, **kw):
        seen.update(prompts=prompts, completions=completions)
        return [float(len(c[0]["content"])) for c in completions]

    class TextReader(LengthPenalty):  # hfpg's built-ins read text
        def __call__(self, prompts, completions, **kw):
            seen.update(builtin_prompts=prompts, builtin_completions=completions)
            return super().__call__(prompts, completions, **kw)

    trainer = trainer_for(
        tok,
        tmp_path,
        [trl_style, TextReader(target=3)],
        dataset=conversations(),
        model=tiny_llama(tok),
        chat_template_kwargs={"shout": True},
    )
    trainer.train()
    r = trainer.last_rollout
    rendered = [
        tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True, shout=True) for p in seen["prompts"]
    ]
    assert r.prompts == rendered and rendered[0].endswith("<|assistant|>LOUD ")
    want = tok(rendered[0], add_special_tokens=False)["input_ids"]
    assert r.prompt_ids[0][r.prompt_mask[0].bool()].tolist() == want  # no BOS added on top of the template
    assert seen["prompts"][0][0]["role"] == "user"
    assert seen["completions"] == [[{"role": "assistant", "content": c}] for c in r.completions]
    assert seen["builtin_prompts"] == rendered and seen["builtin_completions"] == r.completions


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "plain"}, {"prompt": [{"role": "user", "content": "hi"}]}],
            r"mixes string and message-list.*row 1",
        ),
        ([{"prompt": [{"role": "usr", "content": "hi"}]}], r"row 0: message 0 has role 'usr'"),
        ([{"prompt": [{"role": "user"}]}], r"row 0: message 0 \(user\) needs a 'content' string"),
        ([{"prompt": 3}], r"row 0: a prompt must be a string or a list of messages"),
    ],
)
def test_bad_conversational_rows_are_one_clear_error(rows, message, tokenizer, tmp_path):
    with pytest.raises(DataError, match=message):
        trainer_for(
            chat_tokenizer(tokenizer), tmp_path, lambda completions, **kw: [0.0] * len(completions), dataset=rows
        )


def test_messages_without_a_chat_template_fail_before_the_model_loads(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("hfpg.trainer.with_value_head", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(DataError, match=r"conversational prompts.*no chat template"):
        trainer_for(tokenizer, tmp_path, lambda completions, **kw: [0.0] * len(completions), dataset=conversations())


def test_a_conversational_recipe_keeps_messages_and_reports_rendered_text(tokenizer, tmp_path):
    tok = chat_tokenizer(tokenizer)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in conversations(6)))
    train, _ = load_prompts(DataSpec(path=str(data), system_prompt="be brief"), tok)
    assert train[0]["prompt"][0] == {"role": "system", "content": "be brief"}
    assert train[0]["prompt"][1]["role"] == "user" and "prompt_text" not in train.column_names
    with pytest.raises(DataError, match=r"prompt_template and data\.prompt_max_words apply to string prompts"):
        load_prompts(DataSpec(path=str(data), prompt_max_words=3), tok)


# ---- names, clip-higher, kl_coef 0, factories --------------------------------------------------------------------
def test_clip_range_high_clips_only_the_upper_side():
    ratio = torch.tensor([[1.5, 0.5]])
    adv = torch.tensor([[1.0, -1.0]])
    loss, clipped, _ = ops.ppo_policy_loss(ratio.log(), torch.zeros(1, 2), adv, 0.2, clip_range_high=0.6)
    assert loss[0].tolist() == pytest.approx([-1.5, 0.8]) and clipped.tolist() == [[False, True]]  # 1.5 < 1 + 0.6
    loss, clipped, _ = ops.ppo_policy_loss(ratio.log(), torch.zeros(1, 2), adv, 0.2)
    assert loss[0].tolist() == pytest.approx([-1.2, 0.8]) and clipped.tolist() == [[True, True]]


def test_kl_coef_zero_loads_and_runs_no_reference(tokenizer, tmp_path, monkeypatch):
    calls = []
    import hfpg.trainer as trainer_module

    real = trainer_module.reference_context
    monkeypatch.setattr(trainer_module, "reference_context", lambda *a: calls.append(1) or real(*a))
    trainer = trainer_for(tokenizer, tmp_path, lambda completions, **kw: [1.0] * len(completions), kl_coef=0.0)
    assert trainer.ref_model is None and not trainer.uses_reference
    metrics = trainer.train()
    assert calls == [] and "objective/kl" not in metrics and trainer.last_rollout.ref_logprobs is None
    with pytest.raises(ConfigError, match="adaptive_kl=true multiplies kl_coef, which stays 0"):
        PGConfig(kl_coef=0.0, adaptive_kl=True)


def test_factory_rewards_in_yaml_are_built_once_with_their_arguments(tmp_path):
    (tmp_path / "factories.py").write_text(
        "BUILT = []\n"
        "def make_threshold(at, bonus=1.0):\n"
        "    BUILT.append(at)\n"
        "    def threshold(completion_ids, **kwargs):\n"
        "        return [bonus if len(ids) >= at else 0.0 for ids in completion_ids]\n"
        "    return threshold\n"
        "def not_a_factory(x):\n"
        "    return 3\n"
    )
    reward = build_reward(
        [{"factory": "factories.py:make_threshold", "kwargs": {"at": 2, "bonus": 5.0}}], base_dir=str(tmp_path)
    )
    assert reward.names == ["threshold"]
    assert reward(["p", "q"], ["a", "b"], completion_ids=[[1], [1, 2]]) == [0.0, 5.0]
    with pytest.raises(ConfigError, match=r"returned int, not a reward callable"):
        build_reward([{"factory": "factories.py:not_a_factory", "kwargs": {"x": 1}}], base_dir=str(tmp_path))
    problems = spec_problems([{"name": "bleu", "factory": "a:b"}, {"factory": "nocolon"}])
    assert "both 'name' and 'factory'" in problems[0] and "factory must be module:function" in problems[1]


def test_a_conversational_recipe_runs_to_its_report(tokenizer, tmp_path):
    from hfpg.recipe import recipe_from_dict
    from hfpg.runner import train_recipe

    tok = chat_tokenizer(tokenizer)
    model_dir = tmp_path / "chat-model"
    tiny_llama(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in conversations(8)))
    (tmp_path / "my_rewards.py").write_text(
        "def chars(completions, **kwargs):\n    return [float(len(c[0]['content'])) for c in completions]\n"
    )
    out = tmp_path / "run"
    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(data), "eval_size": 4},
            "report": {"samples_every": 1, "num_samples": 2},
            "rewards": [{"name": "my_rewards.py:chars"}],
            "output_dir": str(out),
            "max_steps": 2,
            "rollout_batch_size": 4,
            "mini_batch_size": 4,
            "max_new_tokens": 4,
            "report_to": [],
            "disable_tqdm": True,
        },
        str(tmp_path / "recipe.yaml"),
    )
    paths = train_recipe(recipe)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"].startswith("<|user|>") and samples[0]["prompt"].endswith("<|assistant|>")
    report = Path(paths["report"]).read_text()
    assert "| <\\|user\\|>" in report and "[{'role'" not in report  # the rendered text, not the list's repr
