"""Streaming prompts: a ``datasets.IterableDataset`` as train_dataset — passes, sharding over processes, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import small_run, tiny_gpt2, torchrun
from datasets import Dataset, IterableDataset

from hfpg import PGConfig, PGTrainer
from hfpg.data import PromptSampler, Rows, StreamSampler, as_dataset, make_sampler
from hfpg.errors import ConfigError, DataError

ROWS = [{"prompt": f"the cat {i}", "id": i} for i in range(10)]


def stream(n_shards: int = 2, shuffle: bool = False, rows=ROWS) -> IterableDataset:
    ds = Dataset.from_list(rows).to_iterable_dataset(num_shards=n_shards)
    return ds.shuffle(seed=7, buffer_size=4) if shuffle else ds


def ids(rows: list[dict]) -> list[int]:
    return [r["id"] for r in rows]


def draw(sampler, steps: int) -> list[int]:
    return [i for _ in range(steps) for i in ids(sampler.next_rows())]


# ---- (a) passes ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_row_once_per_pass_then_a_new_pass(shuffle):
    sampler = StreamSampler(stream(shuffle=shuffle), global_batch=4, seed=0)
    drawn = draw(sampler, 5)  # 20 rows: two passes over 10, the third step wraps mid-batch
    first, second = drawn[:10], drawn[10:]
    assert sorted(first) == sorted(second) == list(range(10))
    assert sampler.epoch == 1 and sampler.stream.epoch == 1  # the second pass ran under set_epoch(1)
    if shuffle:  # set_epoch reshuffles a shuffled stream
        assert first != second
    else:
        assert first == second == list(range(10))


def test_rows_are_dicts_of_the_stream_columns():
    rows = StreamSampler(stream(), global_batch=2, seed=0).next_rows()
    assert rows == [ROWS[0], ROWS[1]]


def test_an_empty_stream_is_a_clear_error():
    empty = stream().filter(lambda r: False)
    with pytest.raises(DataError, match="yields no rows"):
        StreamSampler(empty, global_batch=2, seed=0).next_rows()


def test_batch_not_divisible_by_processes_is_a_config_error():
    with pytest.raises(ConfigError, match="multiple of num_processes"):
        StreamSampler(stream(), global_batch=3, seed=0, process_index=0, num_processes=2)


# ---- (b) sharding over processes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_shards", [2, 3])  # whole shards per process; every other row (3 shards, 2 processes)
def test_processes_get_disjoint_rows_that_make_up_the_global_batch(n_shards):
    ds = stream(n_shards)
    procs = [StreamSampler(ds, global_batch=4, seed=0, process_index=r, num_processes=2) for r in range(2)]
    seen: list[list[int]] = [[], []]
    for _ in range(2):
        step = [ids(p.next_rows()) for p in procs]
        assert [len(s) for s in step] == [2, 2]
        assert not set(step[0]) & set(step[1])  # no prompt twice in one global batch
        for r in range(2):
            seen[r] += step[r]
    # a pass of each process's part: 5 rows each, disjoint, together the whole stream
    seen[0].append(procs[0].next_rows()[0]["id"])
    seen[1].append(procs[1].next_rows()[0]["id"])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(10))


# ---- (c) resume ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("global_batch,k", [(4, 1), (4, 3), (5, 2)])  # mid-pass, in the next pass, at a pass's end
def test_resumed_sampler_draws_what_an_uninterrupted_one_draws(global_batch, k):
    straight = StreamSampler(stream(), global_batch, seed=0)
    expected = draw(straight, k + 3)[k * global_batch :]
    interrupted = StreamSampler(stream(), global_batch, seed=0)
    draw(interrupted, k)
    state = json.loads(json.dumps(interrupted.state_dict()))  # JSON-serialisable
    assert state["epoch"] == (k * global_batch - 1) // 10
    resumed = StreamSampler(stream(), global_batch, seed=0)
    resumed.load_state_dict(state)
    assert draw(resumed, 3) == expected


def test_resumed_shuffled_stream_skips_only_its_shuffle_buffer_then_is_exact():
    """datasets does not save a shuffle buffer's rows: the resumed pass goes on without them, the next pass is exact."""

    def tagged(sampler, n):  # (pass, id) of the next n rows, one row a step
        return [(sampler.next_rows()[0]["id"], sampler.epoch)[::-1] for _ in range(n)]

    straight = tagged(StreamSampler(stream(shuffle=True), 1, seed=0), 20)
    interrupted = StreamSampler(stream(shuffle=True), 1, seed=0)
    before = tagged(interrupted, 3)
    assert before == straight[:3]
    resumed = StreamSampler(stream(shuffle=True), 1, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    after = tagged(resumed, 17)
    rest_of_pass = [i for e, i in after if e == 0]
    assert len(set(rest_of_pass)) == len(rest_of_pass)  # no row twice in a pass
    assert not set(rest_of_pass) & {i for _, i in before}  # only unseen rows
    assert len(rest_of_pass) >= 10 - 3 - 4  # all but at most buffer_size=4 of them
    assert [x for x in after if x[0] == 1] == [x for x in straight if x[0] == 1]  # the next pass: the same order


def test_each_process_resumes_its_own_part():
    def make(r):
        return StreamSampler(stream(), global_batch=4, seed=0, process_index=r, num_processes=2)

    straight = [make(r) for r in range(2)]
    expected = [draw(s, 4)[4:] for s in straight]
    states = []
    for r in range(2):
        s = make(r)
        draw(s, 2)
        states.append(json.loads(json.dumps(s.state_dict())))
    for r in range(2):
        resumed = make(r)
        resumed.load_state_dict(states[r])
        assert draw(resumed, 2) == expected[r]


def test_resume_with_another_number_of_processes_is_a_clear_error():
    state = StreamSampler(stream(), global_batch=4, seed=0).state_dict()
    with pytest.raises(DataError, match="same number of processes"):
        StreamSampler(stream(), global_batch=4, seed=0, process_index=0, num_processes=2).load_state_dict(state)


def test_the_callers_dataset_is_left_alone():
    ds = stream(shuffle=True)
    sampler = StreamSampler(ds, global_batch=4, seed=0)
    draw(sampler, 4)
    sampler.load_state_dict(sampler.state_dict())
    assert ds.epoch == 0 and [r["id"] for r in ds] == [r["id"] for r in stream(shuffle=True)]


# ---- make_sampler, PromptSampler.next_rows, as_dataset ---------------------------------------------------------------
def test_make_sampler_picks_the_sampler_for_the_data():
    assert isinstance(make_sampler(stream(), 4, 0, 0, 1), StreamSampler)
    rows = Rows(ROWS)
    sampler = make_sampler(rows, 4, 0, 1, 2)
    assert isinstance(sampler, PromptSampler)
    reference = PromptSampler(len(ROWS), 4, 0, 1, 2)
    for _ in range(3):  # the rows of next_local(), as dicts
        assert sampler.next_rows() == [ROWS[i] for i in reference.next_local()]
    arrow = make_sampler(Dataset.from_list(ROWS), 4, 0, 0, 1)
    assert arrow.next_rows() == [ROWS[i] for i in PromptSampler(len(ROWS), 4, 0).next_local()]


def test_a_stream_trains_but_does_not_evaluate():
    ds = stream()
    assert as_dataset(ds, "train_dataset") is ds
    with pytest.raises(DataError, match=r"eval_dataset is a datasets.IterableDataset.*take\(n\)"):
        as_dataset(ds, "eval_dataset")


# ---- (d), (e) PGTrainer on a stream ----------------------------------------------------------------------------------
class Recorder:
    """A toy reward that records the ids of the rows it scored."""

    def __init__(self):
        self.ids: list[int] = []

    def __call__(self, prompts, completions, id=None, **columns):
        assert all(p == f"the cat {i}" for p, i in zip(prompts, id))  # the row's prompt with its own columns
        self.ids += list(id)
        return [len(c) / 10 for c in completions]


def make_trainer(tokenizer, tmp_path, dataset, reward=None, **overrides):
    return PGTrainer(
        tiny_gpt2(tokenizer),
        tokenizer,
        PGConfig(**small_run(tmp_path, **overrides)),
        train_dataset=dataset,
        reward_fn=reward or Recorder(),
    )


def test_pg_trainer_trains_on_a_stream_and_resumes_where_it_was(tokenizer, tmp_path):
    rows = ROWS[:6]  # 4 prompts a step: the second step wraps into the stream's second pass
    straight_reward = Recorder()
    straight = make_trainer(tokenizer, tmp_path / "a", stream(rows=rows), straight_reward, max_steps=4)
    before = {k: v.clone() for k, v in straight.unwrapped_model.state_dict().items()}
    straight.train()
    assert straight.global_step == 4 and len(straight.log_history) == 4
    assert straight_reward.ids == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]  # the stream, pass after pass
    after = straight.unwrapped_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained

    first_reward = Recorder()
    first = make_trainer(tokenizer, tmp_path / "b", stream(rows=rows), first_reward, max_steps=2)
    first.train()
    assert first.global_step == 2 and first_reward.ids == straight_reward.ids[:8]
    path = first.save_checkpoint()
    resumed_reward = Recorder()
    resumed = make_trainer(tokenizer, tmp_path / "b", stream(rows=rows), resumed_reward, max_steps=4)
    resumed.train(resume_from_checkpoint=path)
    assert resumed.global_step == 4
    assert resumed_reward.ids == straight_reward.ids[8:]  # the stream continues with the rows not yet seen


def test_num_samples_per_prompt_repeats_each_streamed_row(tokenizer, tmp_path):
    reward = Recorder()
    trainer = make_trainer(tokenizer, tmp_path, stream(), reward, max_steps=1, num_samples_per_prompt=2)
    trainer.train()
    assert reward.ids == [0, 0, 1, 1]


def test_stream_without_the_prompt_column_fails_before_training(tokenizer, tmp_path):
    ds = stream().rename_column("prompt", "question")
    with pytest.raises(DataError, match="no column 'prompt'"):
        make_trainer(tokenizer, tmp_path, ds)


def test_stream_with_a_non_text_prompt_in_its_first_rows_fails_before_training(tokenizer, tmp_path):
    def rows():
        yield {"prompt": "the cat", "id": 0}
        yield {"prompt": 3, "id": 1}

    with pytest.raises(DataError, match=r"row 1: .*must be a string"):
        make_trainer(tokenizer, tmp_path, IterableDataset.from_generator(rows))


def test_a_bad_row_later_in_the_stream_stops_before_that_steps_update(tokenizer, tmp_path):
    def rows():
        for i in range(4):
            yield {"prompt": f"the cat {i}", "id": i}
        yield {"prompt": "", "id": 4}  # the second step's first row: not among the rows checked up front

    reward = Recorder()
    trainer = make_trainer(tokenizer, tmp_path, IterableDataset.from_generator(rows), reward)
    with pytest.raises(DataError, match=r"step 2.*row 0: the prompt is empty"):
        trainer.train()
    assert trainer.global_step == 1 and reward.ids == [0, 1, 2, 3]


# ---- two real processes (torchrun + gloo on CPU) -------------------------------------------------------------------
DDP_SCRIPT = """
import json, os, sys

sys.path.insert(0, sys.argv[2])  # tests/, for conftest
from accelerate.state import AcceleratorState, GradientState
from conftest import make_tokenizer, tiny_gpt2
from datasets import Dataset

from hfpg import PGConfig, PGTrainer

out = sys.argv[1]
rows = [{"prompt": f"the cat {i}", "id": i} for i in range(9)]  # 2 shards of 5 and 4 rows: the ranks drift apart


def run(name, max_steps, resume=None, save=False):
    seen = []

    def reward(prompts, completions, id, **columns):
        seen.append(list(id))
        return [len(c) / 10 for c in completions]

    tok = make_tokenizer()
    cfg = PGConfig(output_dir=os.path.join(out, name), max_steps=max_steps, rollout_batch_size=4, mini_batch_size=4,
                   ppo_epochs=1, max_new_tokens=4, report_to=[], disable_tqdm=True)
    stream = Dataset.from_list(rows).to_iterable_dataset(num_shards=2)
    trainer = PGTrainer(tiny_gpt2(tok), tok, cfg, train_dataset=stream, reward_fn=reward)
    trainer.train(resume_from_checkpoint=resume)
    path = trainer.save_checkpoint() if save else None
    rank = trainer.accelerator.process_index
    AcceleratorState._reset_state()  # the next trainer in this process; the process group stays
    GradientState._reset_state()
    return rank, seen, path


rank, straight, _ = run("a", 5)
_, first, path = run("b", 3, save=True)
_, resumed, _ = run("b", 5, resume=path)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"straight": straight, "first": first, "resumed": resumed}, f)
"""


def test_two_processes_read_their_own_rows_and_each_resumes_its_own_position(tmp_path):
    """The main process writes the checkpoint: the sampler's state holds every process's position."""
    script = tmp_path / "stream_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    torchrun(str(script), str(tmp_path), str(Path(__file__).parent), env=env)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for a, b in zip(r0["straight"], r1["straight"]):
        assert len(a) == len(b) == 2 and not set(a) & set(b)  # 2 prompts each, none shared
    assert sorted(i for step in r0["straight"][:2] + r1["straight"][:2] for i in step) == [0, 1, 2, 3, 5, 6, 7, 8]
    for r in (r0, r1):
        assert r["first"] == r["straight"][:3]
        assert r["resumed"] == r["straight"][3:]  # each rank where it was, though rank 1 wrapped a row earlier
    assert r1["resumed"] == [[7, 8], [5, 6]]
