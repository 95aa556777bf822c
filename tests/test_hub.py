"""Model cards and pushes, offline: HfApi's methods (or its HTTP client) are intercepted, nothing leaves the machine."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
import torch
import yaml
from conftest import tiny_gpt2
from huggingface_hub import HfApi, ModelCard
from peft import LoraConfig
from test_trainer import length_reward, make_trainer
from transformers import AutoModelForCausalLM

from hfpg import AutoModelForCausalLMWithValueHead, CombinedReward, HubError, PGConfig
from hfpg.cards import final_metrics
from hfpg.cli import main
from hfpg.hub import push_model_folder

SECRET = "hf_SECRETtoken1234567890abcdef"


def shorter(prompts, completions, **columns):
    return [-len(c) / 10 for c in completions]


def snapshot(folder) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes: equal snapshots = untouched folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


@pytest.fixture
def run(tokenizer, tmp_path):
    """A trained LoRA run over a base saved on disk, with a held-out evaluation and a combined reward."""
    base = tmp_path / "base"
    tiny_gpt2(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), peft_config=lora
    )
    reward = CombinedReward({length_reward: 1.0, shorter: 0.5})
    trainer = make_trainer(tokenizer, tmp_path, model=model, reward=reward, learning_rate=5e-2)
    trainer.model_card_data.update(base_model="openai-community/gpt2", datasets=["stanfordnlp/imdb"])
    trainer.train()
    trainer.evaluate(trainer.train_dataset)
    trainer.save_model(os.path.join(trainer.config.output_dir, "final"))
    return trainer


class FakeHub:
    """Stands in for HfApi.create_repo / create_branch / create_commit and records what they were given."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.files: dict[str, bytes] = {}
        self.commit: dict = {}

    def install(self, monkeypatch):
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", repo_id, kwargs.get("private"), api.token))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(api, repo_id, *, branch, **kwargs):
            hub.calls.append(("create_branch", repo_id, branch, api.token))

        def create_commit(api, repo_id, operations, *, commit_message, revision=None, **kwargs):
            hub.calls.append(("create_commit", repo_id, revision, api.token))
            hub.commit = {"message": commit_message, "revision": revision, "create_pr": kwargs.get("create_pr")}
            for op in operations:
                with op.as_file() as f:
                    hub.files[op.path_in_repo] = f.read()
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123", pr_url=None)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        return self

    def card(self) -> ModelCard:
        return ModelCard(self.files["README.md"].decode())


@pytest.fixture
def online(monkeypatch):
    """The Hub looks reachable (tests run with HF_HUB_OFFLINE=1) and a token is configured."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", SECRET)


@pytest.fixture
def fake_hub(monkeypatch, online):
    return FakeHub().install(monkeypatch)


# ---- model card ------------------------------------------------------------------------------------------------------
def test_saved_folder_has_a_model_card_with_metadata_and_the_resolved_config(run):
    folder = os.path.join(run.config.output_dir, "final")
    card = ModelCard.load(os.path.join(folder, "README.md"))
    meta = card.data.to_dict()
    assert meta["base_model"] == "openai-community/gpt2"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"hfpg", "ppo", "lora", "reinforcement-learning"} <= set(meta["tags"])
    assert meta["datasets"] == ["stanfordnlp/imdb"]
    assert meta["rewards"] == [{"name": "length_reward", "weight": 1.0}, {"name": "shorter", "weight": 0.5}]
    last_eval = [r for r in run.log_history if "eval/scores" in r][-1]
    last_train = [r for r in run.log_history if "objective/kl" in r][-1]
    metrics = meta["final_metrics"]
    assert metrics["eval/scores"] == pytest.approx(last_eval["eval/scores"], rel=1e-3)
    assert metrics["objective/kl"] == pytest.approx(last_train["objective/kl"], rel=1e-3, abs=1e-9)
    assert metrics["reward/shorter/mean"] == pytest.approx(last_train["reward/shorter/mean"], rel=1e-3)
    assert "AutoPeftModelForCausalLM.from_pretrained" in card.text and "| shorter | 0.5 |" in card.text
    config = PGConfig.from_yaml(os.path.join(folder, "hfpg_config.yaml"))
    local = os.path.basename(run.config.output_dir)  # no absolute local path leaves the machine
    assert config.to_dict() == {**run.config.to_dict(), "output_dir": local}


def test_full_model_card_and_hub_id_guess(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=1)
    assert trainer.model_card_data["base_model"] is None  # built in memory: no Hub id to name
    out = trainer.save_model(str(tmp_path / "full"))
    meta = ModelCard.load(os.path.join(out, "README.md")).data.to_dict()
    assert meta["library_name"] == "transformers" and "base_model" not in meta and "lora" not in meta["tags"]
    assert meta["rewards"] == [{"name": "length_reward", "weight": 1.0}]


def test_final_metrics_takes_the_last_value_of_each_and_drops_non_finite():
    history = [
        {"step": 1, "objective/kl": 1.0, "eval/scores": 0.123456},
        {"step": 2, "objective/kl": 2.0, "reward/a/mean": float("nan"), "reward/b/mean": 3.0},
    ]
    assert final_metrics(history) == {"eval/scores": 0.1235, "objective/kl": 2.0, "reward/b/mean": 3.0}


# ---- push: what is uploaded ----------------------------------------------------------------------------------------
def test_trainer_push_uploads_the_saved_folder_with_card_and_hub_adapter_config(run, fake_hub, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    url = run.push_to_hub("me/tiny-ppo", private=True, revision="exp", commit_message="first push")
    folder = os.path.join(run.config.output_dir, "final")
    assert url == "https://huggingface.co/me/tiny-ppo/commit/abc123"
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "create_branch", "create_commit"]
    assert fake_hub.calls[0][:3] == ("create_repo", "me/tiny-ppo", True)
    assert fake_hub.calls[1][2] == "exp" and fake_hub.commit == {
        "message": "first push",
        "revision": "exp",
        "create_pr": False,
    }
    tokenizer_files = set(os.listdir(folder)) - {
        "adapter_config.json",
        "adapter_model.safetensors",
        "value_head.safetensors",
        "hfpg_config.yaml",
        "README.md",
    }
    assert "tokenizer_config.json" in tokenizer_files
    assert (
        set(fake_hub.files)
        == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "value_head.safetensors",
            "hfpg_config.yaml",
            "README.md",
        }
        | tokenizer_files
    )
    for name in ("adapter_model.safetensors", "value_head.safetensors", "hfpg_config.yaml"):
        assert fake_hub.files[name] == Path(folder, name).read_bytes()
    # the pushed and the saved adapter both name the Hub base the card names: no local path in either
    assert json.loads(fake_hub.files["adapter_config.json"])["base_model_name_or_path"] == "openai-community/gpt2"
    local = json.loads(Path(folder, "adapter_config.json").read_text())["base_model_name_or_path"]
    assert local == "openai-community/gpt2"
    card = fake_hub.card()
    assert 'from_pretrained("me/tiny-ppo")' in card.text and card.data.base_model == "openai-community/gpt2"
    assert card.data.to_dict()["rewards"][1] == {"name": "shorter", "weight": 0.5}
    assert fake_hub.calls[0][3] is None  # the token was found by huggingface_hub itself (HF_TOKEN) ...
    out = capsys.readouterr()
    for text in (out.out, out.err, caplog.text, *(v.decode("utf-8", "replace") for v in fake_hub.files.values())):
        assert SECRET not in text  # ... and printed, logged or written nowhere


def test_cli_push_uploads_a_run_directory_without_writing_to_it(run, fake_hub, capsys):
    before = snapshot(run.config.output_dir)
    assert main(["push", run.config.output_dir, "me/tiny-ppo", "--private", "--token", SECRET]) == 0
    assert "https://huggingface.co/me/tiny-ppo/commit/abc123" in capsys.readouterr().out
    assert fake_hub.calls[0] == ("create_repo", "me/tiny-ppo", True, SECRET)
    assert "adapter_model.safetensors" in fake_hub.files and fake_hub.commit["revision"] is None
    assert snapshot(run.config.output_dir) == before


def test_cli_push_merge_uploads_a_full_model_that_plain_transformers_loads(
    run, fake_hub, tmp_path, tokenizer, monkeypatch
):
    # merging needs the base weights: offline, point the saved adapter at the local base (relative, as saved folders
    # name a local base that has no Hub id) and work from its folder
    adapter = Path(run.config.output_dir, "final", "adapter_config.json")
    adapter.write_text(json.dumps({**json.loads(adapter.read_text()), "base_model_name_or_path": "base"}))
    monkeypatch.chdir(tmp_path)
    before = snapshot(run.config.output_dir)
    assert main(["push", run.config.output_dir, "me/tiny-ppo-merged", "--merge"]) == 0
    assert snapshot(run.config.output_dir) == before
    files = set(fake_hub.files)
    assert {
        "config.json",
        "model.safetensors",
        "value_head.safetensors",
        "hfpg_config.yaml",
        "README.md",
        "tokenizer_config.json",
    } <= files
    assert not any(f.startswith("adapter_") for f in files)
    meta = fake_hub.card().data.to_dict()
    assert meta["library_name"] == "transformers" and "lora" not in meta["tags"]
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-ppo-merged")' in fake_hub.card().text
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name, data in fake_hub.files.items():
        (pulled / name).write_bytes(data)
    batch = tokenizer(["the cat sat on the mat"], return_tensors="pt")
    with torch.no_grad():
        expected = run.unwrapped_model.eval()(**batch).logits
        got = AutoModelForCausalLM.from_pretrained(pulled).eval()(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- push: failures ------------------------------------------------------------------------------------------------
@pytest.fixture
def http(monkeypatch, online):
    """huggingface_hub's real HfApi talking to a fake Hub through httpx's MockTransport."""
    state = {"handler": None, "requests": []}

    def transport(request):
        state["requests"].append(request)
        return state["handler"](request)

    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(transport)))
    huggingface_hub.close_session()
    yield state
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)
    huggingface_hub.close_session()


def answer(status, headers=None):
    return lambda request: httpx2.Response(status, headers=headers or {}, json={"error": "refused by the fake hub"})


def network_down(request):
    raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)


@pytest.mark.parametrize(
    "handler, expected",
    [
        (answer(401), "rejected the token (401"),
        (answer(403), "permission denied (403"),
        (answer(404, {"X-Error-Code": "RepoNotFound"}), "repository not found (404)"),
        (answer(503), "HTTP 503"),
        (network_down, "cannot be reached (ConnectError"),
    ],
    ids=["401", "403", "404", "503", "network-down"],
)
def test_refused_or_unreachable_hub_says_why_and_leaves_the_run_intact(run, http, handler, expected, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    http["handler"] = handler
    before = snapshot(run.config.output_dir)
    assert main(["push", run.config.output_dir, "me/tiny-ppo", "--token", SECRET]) == 2
    err = capsys.readouterr().err
    assert expected in err and "unchanged" in err and "Traceback" not in err
    assert err.startswith("error: cannot push to me/tiny-ppo") and err.count("\n") == 1
    assert http["requests"], "the fake Hub was never asked"
    assert any(r.headers.get("authorization") == f"Bearer {SECRET}" for r in http["requests"])
    assert SECRET not in err and SECRET not in caplog.text
    assert snapshot(run.config.output_dir) == before
    with pytest.raises(HubError, match=re.escape(expected)):
        run.push_to_hub("me/tiny-ppo", token=SECRET)


def test_missing_token_offline_mode_and_bad_repo_id_fail_before_any_request(run, http, monkeypatch):
    http["handler"] = answer(200)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubError, match=r"no Hugging Face token found.*hf auth login"):
        push_model_folder(run.config.output_dir, "me/tiny-ppo")
    with pytest.raises(HubError, match="not a Hub repo id"):
        push_model_folder(run.config.output_dir, "me/tiny ppo", token=SECRET)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        push_model_folder(run.config.output_dir, "me/tiny-ppo", token=SECRET)
    assert http["requests"] == []
    with pytest.raises(HubError, match="holds no saved model"):
        push_model_folder(os.path.dirname(run.config.output_dir), "me/tiny-ppo", token=SECRET)


def test_push_to_hub_needs_a_repo_id(run):
    from hfpg import ConfigError

    with pytest.raises(ConfigError, match="needs a repo id"):
        run.push_to_hub()


def test_cli_push_folder_without_a_card_still_gets_one(run, fake_hub, tmp_path):
    """A folder saved by an older hfpg (or by hand) has no README.md: the push builds a card from its files."""
    import shutil

    folder = tmp_path / "bare"
    shutil.copytree(os.path.join(run.config.output_dir, "final"), folder)
    os.remove(folder / "README.md")
    assert main(["push", str(folder), "me/bare"]) == 0
    assert not (folder / "README.md").exists()
    meta = fake_hub.card().data.to_dict()
    assert meta["library_name"] == "peft" and "hfpg" in meta["tags"]
    assert meta["base_model"] == "openai-community/gpt2"  # from the saved adapter config, which names the Hub base
    assert yaml.safe_load(io.BytesIO(fake_hub.files["hfpg_config.yaml"]))["algorithm"] == "ppo"


def test_dry_run_lists_the_upload_offline_and_without_a_token(run, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # and HF_HUB_OFFLINE=1, as in every test
    before = snapshot(run.config.output_dir)
    assert main(["push", run.config.output_dir, "me/tiny-ppo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    folder = os.path.join(run.config.output_dir, "final")
    assert out.startswith(f"dry run: would push {len(os.listdir(folder))} files")
    size = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
    assert f"adapter_model.safetensors {size:>12,} bytes".replace(" ", "") in out.replace(" ", "")
    assert "base_model: openai-community/gpt2" in out and "- name: shorter" in out
    assert snapshot(run.config.output_dir) == before
