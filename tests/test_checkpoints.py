"""Checkpoints that resume exactly or fail loudly: atomic saves, a verified manifest, JSON + safetensors only (no pickle
is written or read), every process's own state, rotation that never deletes what it should keep."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import small_run, tiny_gpt2, torchrun
from safetensors.torch import load_file

from hfpg import CheckpointError, PGConfig, PGTrainer, TrainerCallback
from hfpg.saving import _decode, _Encoder, _manifest, _state_of, latest_checkpoint

PROMPTS = ["the cat", "a good day", "hello world", "policy gradient"]
REPLAY = dict(replay_buffer_size=8, replay_batch_size=4)


def length_reward(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]


def spaces(prompts, completions, **columns):
    return [float(c.count(" ")) for c in completions]


def make_trainer(tokenizer, out: Path, **overrides) -> PGTrainer:
    cfg = small_run(out, **overrides)
    return PGTrainer(
        tiny_gpt2(tokenizer),
        tokenizer,
        PGConfig(**cfg),
        train_dataset=[{"prompt": p} for p in PROMPTS * 2],
        reward_fn=[length_reward, spaces],
    )


def save_at(trainer: PGTrainer, *steps: int) -> list[str]:
    """Checkpoints of an untrained trainer at the given step numbers (no training: cheap)."""
    paths = []
    for step in steps:
        trainer.global_step = step
        paths.append(trainer.save_checkpoint())
    return paths


def rewrite_manifest(ckpt: Path) -> None:
    """Record the folder's files as they are now (a state file edited "consistently")."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["files"] = _manifest(str(ckpt))
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, metrics) -> None:
        trainer.should_stop = step >= self.step


class _Planted:
    """A pickle that, if anything ever unpickles it, leaves a flag file behind and raises."""

    def __init__(self, flag: str):
        self.flag = flag

    def __reduce__(self):
        code = f"open({self.flag!r}, 'w').write('unpickled'); raise RuntimeError('a planted pickle was loaded')"
        return (builtins.exec, (code,))


# ---- layout: no pickle, a manifest -----------------------------------------------------------------------------------
def _is_pickle(data: bytes) -> bool:
    # a pickle starts with the PROTO opcode (protocol 2+); torch.save writes a zip archive holding one
    return data[:1] == b"\x80" or data[:4] == b"PK\x03\x04"


def test_a_checkpoint_is_json_and_safetensors_with_a_manifest(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, **REPLAY)
    (path,) = save_at(trainer, 3)
    ckpt = Path(path)
    assert ckpt.name == "checkpoint-3"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == [
        "hfpg_state_0.json",
        "hfpg_state_0.safetensors",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ]
    for p in ckpt.iterdir():
        data = p.read_bytes()
        assert not _is_pickle(data), p.name
        if p.suffix == ".json":
            json.loads(data)
        else:
            load_file(p)  # safetensors
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    assert meta["global_step"] == 3 and meta["num_processes"] == 1
    assert set(meta["files"]) == set(names) - {"trainer_state.json"}
    for name, info in meta["files"].items():
        assert info["size"] == (ckpt / name).stat().st_size
        assert len(info["sha256"]) == 64
    state = json.loads((ckpt / "hfpg_state_0.json").read_text())
    assert set(state["objects"]) == {
        "scheduler",
        "kl_controller",
        "score_shaper",
        "sampler",
        "update_rule",
        "replay_buffer",
        "reward",
    }
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert not list(tmp_path.rglob(".checkpoint-*"))  # the temporary folder became checkpoint-3


def test_a_planted_pickle_is_never_loaded(tokenizer, tmp_path, monkeypatch):
    trainer = make_trainer(tokenizer, tmp_path, **REPLAY)
    (path,) = save_at(trainer, 2)
    flag = tmp_path / "unpickled.flag"
    payload = pickle.dumps(_Planted(str(flag)))
    # named like Accelerate's files, which Accelerate itself would load
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (Path(path) / name).write_bytes(payload)
    with pytest.raises(RuntimeError, match="planted"):  # the payload is live
        pickle.loads(payload)
    flag.unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was read with pickle")

    resumed = make_trainer(tokenizer, tmp_path, **REPLAY)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    resumed.load_checkpoint(True)
    assert resumed.global_step == 2
    assert not flag.exists()


# ---- every piece of state comes back ---------------------------------------------------------------------------------
def test_rng_of_python_numpy_and_torch_is_restored(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    torch.rand(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    (path,) = save_at(trainer, 1)
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    trainer.load_checkpoint(path)
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist()) == expected


def test_state_encoding_round_trips_through_json_and_safetensors(tmp_path):
    base = torch.arange(12.0)
    state = {
        "tuple": (1, (2.5, None), "x"),
        "int_keys": {0: {"step": torch.tensor(3.0), "m": base[:4]}, 1: {"m": base[4:8]}},  # views of one storage
        "mask": torch.tensor([True, False]),
        "nested": [{"a": float("inf")}, [1, 2]],
        "text": "__hfpg_tensor__",
    }
    enc = _Encoder()
    data = json.loads(json.dumps(enc.encode(state, "s")))
    safetensors.torch.save_file(enc.tensors, str(tmp_path / "t.safetensors"))
    back = _decode(data, load_file(tmp_path / "t.safetensors"), "t")
    assert back["tuple"] == (1, (2.5, None), "x") and isinstance(back["tuple"][1], tuple)
    assert set(back["int_keys"]) == {0, 1}
    assert torch.equal(back["int_keys"][0]["m"], base[:4]) and torch.equal(back["int_keys"][1]["m"], base[4:8])
    assert back["int_keys"][0]["step"].item() == 3.0 and back["mask"].tolist() == [True, False]
    assert back["nested"] == [{"a": float("inf")}, [1, 2]] and back["text"] == "__hfpg_tensor__"
    with pytest.raises(CheckpointError, match=r"s\.obj.*is a object"):
        _Encoder().encode({"obj": object()}, "s")


def test_lambda_lr_round_trips_as_plain_data():
    def plain(step):  # LambdaLR keeps None for a plain function
        return 1.0 / (step + 1)

    class Scaled:  # a callable object: its plain attributes are state, the rest is rebuilt by the constructor
        def __init__(self):
            self.factor, self.fn = 0.5, plain

        def __call__(self, step):
            return self.factor * plain(step)

    def build():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-2)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
        return torch.optim.lr_scheduler.LambdaLR(opt, [plain, Scaled()])

    sched = build()
    sched.lr_lambdas[1].factor = 0.25
    for _ in range(3):
        sched.optimizer.step()
        sched.step()
    enc = _Encoder()
    data = json.loads(json.dumps(enc.encode(_state_of("scheduler", sched), "scheduler")))
    assert data["lr_lambdas"] == [None, {"factor": 0.25}] and not enc.tensors
    fresh = build()
    fresh.load_state_dict(_decode(data, {}, "x"))
    assert fresh.last_epoch == 3 and fresh.get_last_lr() == sched.get_last_lr()
    assert fresh.lr_lambdas[1].factor == 0.25 and fresh.lr_lambdas[1].fn is plain
    fresh.step()
    sched.step()
    assert fresh.get_last_lr() == sched.get_last_lr()


def test_replay_buffer_and_running_statistics_resume_exactly(tokenizer, tmp_path):
    """Replay (sampled with the torch RNG from the restored buffer), score_scaling running_std and reward_normalize
    running: the resumed run ends with the weights of the uninterrupted one, bit for bit."""
    kw = dict(max_steps=4, save_steps=2, score_scaling="running_std", reward_normalize="running", **REPLAY)
    straight = make_trainer(tokenizer, tmp_path / "a", **kw)
    straight.train()
    interrupted = make_trainer(tokenizer, tmp_path / "b", **kw)
    interrupted.callbacks.append(StopAt(2))
    interrupted.train()
    assert interrupted.global_step == 2 and len(interrupted.replay) == 8
    resumed = make_trainer(tokenizer, tmp_path / "b", **kw)
    assert len(resumed.replay) == 0 and resumed.score_shaper.moments.count == 0
    resumed.train(resume_from_checkpoint=True)
    assert resumed.global_step == 4
    assert all(r["replay/ratio"] > 0 for r in resumed.log_history)  # replay was on in the resumed steps
    a, b = params(straight.unwrapped_model), params(resumed.unwrapped_model)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:3]
    for ra, rb in zip(straight.log_history[2:], resumed.log_history):
        for key in ("objective/scores", "objective/scores_shaped", "loss/policy", "replay/staleness", "lr"):
            if key in ra:
                assert ra[key] == rb[key], key
    assert straight.score_shaper.state_dict() == resumed.score_shaper.state_dict()
    assert straight.reward_fn.state_dict() == resumed.reward_fn.state_dict()
    assert straight.reward_fn.state_dict()["moments"]  # running reward statistics exist (and were restored)
    assert len(straight.replay.groups) == len(resumed.replay.groups)
    for ga, gb in zip(straight.replay.groups, resumed.replay.groups):
        assert ga["step"] == gb["step"] and torch.equal(ga["response_ids"], gb["response_ids"])
    for p in (tmp_path / "a" / "run").rglob("*"):  # nothing pickled anywhere in the run's checkpoints
        if p.is_file() and "checkpoint-" in str(p):
            assert not _is_pickle(p.read_bytes()[:4]), p


@pytest.mark.parametrize("lora", [False, True], ids=["full-copy", "lora-adapter"])
def test_a_separate_value_model_resumes_exactly(lora, tokenizer, tmp_path):
    """value_model: policy (a full copy, or a second LoRA adapter): the critic's weights, its AdamW state and its
    schedule are checkpointed; the resumed run ends with the policy and critic of the uninterrupted one, bit for bit."""
    from peft import LoraConfig

    from hfpg import AutoModelForCausalLMWithValueHead

    def trainer_for(out):
        cfg = small_run(out, max_steps=4, save_steps=2, value_model="policy", value_model_learning_rate=3e-3)
        model = tiny_gpt2(tokenizer)
        if lora:
            lora_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM")
            model = AutoModelForCausalLMWithValueHead.from_pretrained(model, peft_config=lora_cfg)
        return PGTrainer(
            model,
            tokenizer,
            PGConfig(**cfg, lr_scheduler_type="linear"),
            train_dataset=[{"prompt": p} for p in PROMPTS * 2],
            reward_fn=[length_reward, spaces],
        )

    straight = trainer_for(tmp_path / "a")
    straight.train()
    interrupted = trainer_for(tmp_path / "b")
    interrupted.callbacks.append(StopAt(2))
    interrupted.train()
    ckpt = tmp_path / "b" / "run" / "checkpoint-2"
    assert (ckpt / "value_model.safetensors").is_file() and (ckpt / "value_model_optimizer.json").is_file()
    resumed = trainer_for(tmp_path / "b")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.global_step == 4
    unwrap = straight.accelerator.unwrap_model
    for a, b in (
        (params(straight.unwrapped_model), params(resumed.unwrapped_model)),
        (params(unwrap(straight.critic.model)), params(resumed.accelerator.unwrap_model(resumed.critic.model))),
    ):
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, different[:3]
    sa, sb = straight.critic.optimizer.state_dict()["state"], resumed.critic.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert straight.critic.scheduler.state_dict() == resumed.critic.scheduler.state_dict()
    for ra, rb in zip(straight.log_history[2:], resumed.log_history):
        for key in ("objective/scores", "loss/policy", "loss/value", "value/lr", "lr"):
            assert ra[key] == rb[key], key


# ---- a crash while saving ----------------------------------------------------------------------------------------
def test_a_save_that_crashed_is_never_resumed_from(tokenizer, tmp_path, monkeypatch):
    trainer = make_trainer(tokenizer, tmp_path, **REPLAY)
    (first,) = save_at(trainer, 1)
    out = tmp_path / "run"
    real_save_file = safetensors.torch.save_file
    calls = []

    def crash_on_second_file(*args, **kwargs):  # the model is written, the run dies on the next file
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        save_at(trainer, 2)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    tmp = out / ".checkpoint-2.tmp"
    assert tmp.is_dir() and (tmp / "model.safetensors").is_file() and not (out / "checkpoint-2").exists()
    assert latest_checkpoint(str(out)) == first
    resumed = make_trainer(tokenizer, tmp_path, **REPLAY)
    resumed.load_checkpoint(True)
    assert resumed.global_step == 1

    # a crash after trainer_state.json is written but before the rename: still a .tmp folder nothing reads
    real_replace = os.replace

    def no_rename(src, dst):
        if str(src).endswith(".tmp"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(KeyboardInterrupt):
        save_at(trainer, 3)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / ".checkpoint-3.tmp" / "trainer_state.json").is_file()
    assert latest_checkpoint(str(out)) == first

    # the next save of those steps replaces the half-written folders
    save_at(trainer, 2, 3)
    assert not tmp.exists() and not (out / ".checkpoint-3.tmp").exists()
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-3")


# ---- a corrupt or incomplete checkpoint is an error naming the file ----------------------------------------------
def test_a_truncated_trainer_state_names_it_and_the_previous_good_checkpoint(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    good, bad = save_at(trainer, 1, 2)
    state_file = Path(bad) / "trainer_state.json"
    state_file.write_text(state_file.read_text()[:40])
    assert latest_checkpoint(str(tmp_path / "run")) == good  # the newest *complete* one
    resumed = make_trainer(tokenizer, tmp_path)
    with pytest.raises(CheckpointError) as e:
        resumed.load_checkpoint(True)
    message = str(e.value)
    assert str(state_file) in message and "truncated" in message
    assert f"previous complete checkpoint is {good}" in message and f"delete {bad}" in message
    with pytest.raises(CheckpointError, match=r"checkpoint-2/trainer_state\.json"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.global_step == 0  # nothing was loaded
    resumed.load_checkpoint(good)  # the way out the message names
    assert resumed.global_step == 1


@pytest.mark.parametrize(
    "name", ["hfpg_state_0.json", "hfpg_state_0.safetensors", "optimizer.safetensors", "model.safetensors"]
)
def test_a_missing_state_file_is_an_error_naming_it(tokenizer, tmp_path, name):
    trainer = make_trainer(tokenizer, tmp_path, **REPLAY)
    good, bad = save_at(trainer, 1, 2)
    (Path(bad) / name).unlink()
    assert latest_checkpoint(str(tmp_path / "run")) == good
    resumed = make_trainer(tokenizer, tmp_path, **REPLAY)
    for path in (True, bad):
        with pytest.raises(CheckpointError, match=re.escape(f"{bad}/{name} is missing")) as e:
            resumed.load_checkpoint(path)
        assert good in str(e.value)
    assert resumed.global_step == 0


@pytest.mark.parametrize(
    "drop, named",
    [
        (lambda s, t: s.pop("rng"), "holds no 'rng' entry"),
        (lambda s, t: s["rng"].pop("numpy"), "holds no numpy random state"),
        (lambda s, t: s["objects"].pop("replay_buffer"), "holds no replay_buffer state"),
        (lambda s, t: s["objects"].pop("sampler"), "holds no sampler state"),
        (lambda s, t: s["objects"].pop("kl_controller"), "holds no kl_controller state"),
        (lambda s, t: t.pop("rng.torch"), "refers to the tensor 'rng.torch'"),
    ],
)
def test_a_state_file_without_a_piece_of_the_state_is_an_error(tokenizer, tmp_path, drop, named):
    """Even with a manifest that matches (the files were written that way), a missing piece fails the resume."""
    trainer = make_trainer(tokenizer, tmp_path, **REPLAY)
    trainer.replay.add(_fake_rollout(), torch.ones(4), 0)  # a non-empty buffer
    (path,) = save_at(trainer, 1)
    ckpt = Path(path)
    state = json.loads((ckpt / "hfpg_state_0.json").read_text())
    tensors = load_file(ckpt / "hfpg_state_0.safetensors")
    drop(state, tensors)
    (ckpt / "hfpg_state_0.json").write_text(json.dumps(state))
    safetensors.torch.save_file(tensors, str(ckpt / "hfpg_state_0.safetensors"))
    rewrite_manifest(ckpt)
    resumed = make_trainer(tokenizer, tmp_path, **REPLAY)
    with pytest.raises(CheckpointError, match=r"hfpg_state_0\.json") as e:
        resumed.load_checkpoint(path)
    assert named in str(e.value)
    assert resumed.global_step == 0 and len(resumed.replay) == 0  # nothing was half-loaded


def test_a_changed_file_fails_its_checksum(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    (path,) = save_at(trainer, 1)
    f = Path(path) / "hfpg_state_0.json"
    text = f.read_text()
    f.write_text(text.replace('"global_step": 1', '"global_step": 7'))  # same size, other bytes
    assert f.stat().st_size == len(text)
    with pytest.raises(CheckpointError, match=r"hfpg_state_0.json does not match the sha256"):
        make_trainer(tokenizer, tmp_path).load_checkpoint(path)


def test_a_checkpoint_of_another_setup_is_a_clear_error(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path / "replay", **REPLAY)
    (path,) = save_at(trainer, 1)
    with pytest.raises(CheckpointError, match=r"replay_buffer state .* that this run does not have"):
        make_trainer(tokenizer, tmp_path / "plain").load_checkpoint(path)
    state_file = Path(path) / "trainer_state.json"
    meta = json.loads(state_file.read_text())
    meta["num_processes"] = 2
    state_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="written by 2 processes, this run has 1"):
        make_trainer(tokenizer, tmp_path / "replay", **REPLAY).load_checkpoint(path)


def test_a_checkpoint_of_hfpg_0_1_is_refused_without_unpickling(tokenizer, tmp_path):
    old = tmp_path / "run" / "checkpoint-2"
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text(json.dumps({"global_step": 2, "config": {}}))
    (old / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps({"value": 1.0}))
    assert latest_checkpoint(str(tmp_path / "run")) is None
    with pytest.raises(CheckpointError, match=r"no file manifest.*no longer loads"):
        make_trainer(tokenizer, tmp_path).load_checkpoint(True)


# ---- rotation ----------------------------------------------------------------------------------------------------
def test_rotation_deletes_only_older_complete_checkpoints(tokenizer, tmp_path):
    out = tmp_path / "run"
    in_flight = out / ".checkpoint-9.tmp"  # another run's save in progress
    in_flight.mkdir(parents=True)
    (in_flight / "model.safetensors").write_bytes(b"...")
    broken = out / "checkpoint-0"  # incomplete: not ours to delete
    broken.mkdir()
    trainer = make_trainer(tokenizer, tmp_path, save_total_limit=2)

    def names():
        return sorted(p.name for p in out.iterdir())

    save_at(trainer, 1, 2, 3, 4)
    assert names() == [".checkpoint-9.tmp", "checkpoint-0", "checkpoint-3", "checkpoint-4"]
    save_at(trainer, 2)  # a run resumed from an earlier step: the newer ones stay, and so does the one just written
    assert names() == [".checkpoint-9.tmp", "checkpoint-0", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    trainer.config.save_total_limit = 1
    save_at(trainer, 3)  # rewritten in place; 2 is older and not among the newest 1: deleted
    assert names() == [".checkpoint-9.tmp", "checkpoint-0", "checkpoint-3", "checkpoint-4"]
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert (in_flight / "model.safetensors").read_bytes() == b"..."


# ---- two processes: each resumes its own replay buffer, sampler and RNG -------------------------------------------
DDP_SCRIPT = """
import json, os, sys

sys.path.insert(0, sys.argv[2])  # tests/, for conftest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import make_tokenizer, tiny_gpt2

from hfpg import PGConfig, PGTrainer, TrainerCallback

out = sys.argv[1]


class StopAt(TrainerCallback):
    def on_step_end(self, trainer, step, metrics):
        trainer.should_stop = step >= 2


def reward(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]


def run(name, stop=False, resume=None):
    tok = make_tokenizer()
    cfg = PGConfig(output_dir=os.path.join(out, name), max_steps=4, save_steps=2, rollout_batch_size=4,
                   mini_batch_size=2, ppo_epochs=1, max_new_tokens=4, replay_buffer_size=4, replay_batch_size=2,
                   score_scaling="running_std", report_to=[], disable_tqdm=True)
    rows = [{"prompt": p} for p in ["the cat", "a good day", "hello world", "policy gradient"]]
    trainer = PGTrainer(tiny_gpt2(tok), tok, cfg, train_dataset=rows, reward_fn=reward,
                        callbacks=[StopAt()] if stop else None)
    trainer.train(resume_from_checkpoint=resume)
    weights = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])
    replay = [g["response_ids"].tolist() for g in trainer.replay.groups]
    rank = trainer.accelerator.process_index
    AcceleratorState._reset_state()  # the next trainer in this process; the process group stays
    GradientState._reset_state()
    return weights, replay, rank


w_straight, replay_straight, rank = run("a")
_, replay_at_2, _ = run("b", stop=True)
w_resumed, replay_resumed, _ = run("b", resume=True)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"same_weights": bool(torch.equal(w_straight, w_resumed)), "replay_straight": replay_straight,
               "replay_at_2": replay_at_2, "replay_resumed": replay_resumed,
               "files": sorted(os.listdir(os.path.join(out, "b", "checkpoint-2")))}, f)
"""


def test_two_processes_each_resume_their_own_replay_buffer(tmp_path):
    script = tmp_path / "ddp_resume.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    torchrun(str(script), str(tmp_path), str(Path(__file__).parent), env=env, timeout=600)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["files"] == [
        "hfpg_state_0.json",
        "hfpg_state_0.safetensors",
        "hfpg_state_1.json",
        "hfpg_state_1.safetensors",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ]
    assert r0["replay_at_2"] != r1["replay_at_2"]  # the processes hold different sequences ...
    for r in (r0, r1):
        assert r["same_weights"]  # ... each resumed its own, so the run continued exactly
        assert r["replay_resumed"] == r["replay_straight"]


def _fake_rollout():
    from hfpg.rollout import Rollout

    n, t = 4, 3
    return Rollout(
        prompt_ids=torch.ones(n, 2, dtype=torch.long),
        prompt_mask=torch.ones(n, 2, dtype=torch.bool),
        response_ids=torch.arange(n * t).view(n, t),
        response_mask=torch.ones(n, t, dtype=torch.bool),
        has_stop=torch.ones(n, dtype=torch.bool),
        logprobs=torch.zeros(n, t),
        ref_logprobs=torch.zeros(n, t),
        scores=torch.ones(n),
    )
