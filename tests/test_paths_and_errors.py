"""Runs that survive: nothing machine-specific in a saved or pushed model folder, and one clear line (exit code 2,
no traceback) for each kind of bad input the CLI meets."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from conftest import make_tokenizer, small_run, tiny_gpt2
from huggingface_hub import HfApi
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

from hfpg import AutoModelForCausalLMWithValueHead, PGConfig, PGTrainer, RewardError
from hfpg.cli import main
from hfpg.rewards.base import check_outputs

README = Path(__file__).resolve().parents[1] / "README.md"
PROMPTS = ["the cat sat on", "a good day is", "hello world, this", "policy gradient methods"]
REWARDS_PY = """
def brevity(prompts, completions, model=None, **kwargs):
    return [-len(c) / 10 for c in completions]


def pairs(prompts, completions, **kwargs):
    import torch

    return torch.zeros(len(completions) // 2, 2)  # two values a row: must not be flattened into one per completion
"""


# ---- A: nothing machine-specific in what is saved or pushed --------------------------------------------------------
def machine_strings(tmp_path) -> list[str]:
    """What must never appear in a saved or pushed file: this test's folders, the home folder, the working folder."""
    found = {str(tmp_path), os.path.realpath(tmp_path), os.path.expanduser("~"), os.getcwd()}
    return sorted(s for s in found if len(s.strip(os.sep)) > 1)


def assert_portable(files: dict[str, bytes], tmp_path, where: str) -> None:
    """Every file (its bytes: text files, and the JSON headers of safetensors too) is free of local paths."""
    assert files, where
    for name, data in files.items():
        for text in machine_strings(tmp_path):
            assert text.encode() not in data, f"{where}/{name} names the local path {text}"


def folder_files(folder) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = Path(path).read_bytes()
    return out


class FakeHub:
    """HfApi.create_repo / create_commit, offline: records the files of each commit."""

    def __init__(self, monkeypatch):
        self.files: dict[str, bytes] = {}
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: f"https://huggingface.co/{repo_id}")
        monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw: self.commit(operations))

    def commit(self, operations):
        self.files = {}
        for op in operations:
            with op.as_file() as f:
                self.files[op.path_in_repo] = f.read()
        return SimpleNamespace(commit_url="https://huggingface.co/me/repo/commit/abc", pr_url=None)


@pytest.fixture
def lora_trainer(tmp_path):
    """A LoRA policy over a base loaded from an absolute local folder, a reward file and a reward model named by
    absolute paths, and output_dir under tmp_path: every path a saved folder could leak."""
    tok = make_tokenizer()
    base = tmp_path / "models" / "my-base"
    tiny_gpt2(tok).save_pretrained(base)
    tok.save_pretrained(base)
    (tmp_path / "my_rewards.py").write_text(REWARDS_PY)
    config = PGConfig(
        **small_run(tmp_path, max_steps=1),
        rewards=[{"name": f"{tmp_path / 'my_rewards.py'}:brevity", "weight": 1.0, "kwargs": {"model": str(base)}}],
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base)), peft_config=lora
    )
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    trainer = PGTrainer(model, tokenizer, config, train_dataset=[{"prompt": p} for p in PROMPTS])
    trainer.train()
    return trainer


def test_saved_and_pushed_folders_name_no_local_path(lora_trainer, tmp_path, monkeypatch):
    trainer = lora_trainer
    assert trainer.model_card_data["base_model"] is None  # a local base with no Hub id: its folder name stands in
    final = trainer.save_model(os.path.join(trainer.config.output_dir, "final"))
    assert_portable(folder_files(final), tmp_path, "saved adapter")
    adapter = json.loads(Path(final, "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "my-base"
    config = yaml.safe_load(Path(final, "hfpg_config.yaml").read_text())
    assert config["output_dir"] == "run"
    assert config["rewards"] == [{"name": "my_rewards.py:brevity", "weight": 1.0, "kwargs": {"model": "my-base"}}]
    assert PGConfig.from_yaml(os.path.join(final, "hfpg_config.yaml")).max_steps == 1  # still a valid config
    card = Path(final, "README.md").read_text()
    assert 'AutoPeftModelForCausalLM.from_pretrained("path/to/final")' in card

    merged = trainer.save_model(str(tmp_path / "merged"), merge=True)
    assert "config.json" in os.listdir(merged)
    assert_portable(folder_files(merged), tmp_path, "saved merged model")

    # with a Hub id for the base, every file names it; the push uploads the same portable files, card for the repo
    trainer.model_card_data["base_model"] = "openai-community/gpt2"
    hub = FakeHub(monkeypatch)
    trainer.push_to_hub("me/tiny-ppo", output_dir=str(tmp_path / "pushed"))
    assert_portable(hub.files, tmp_path, "push_to_hub upload")
    assert_portable(folder_files(tmp_path / "pushed"), tmp_path, "folder saved by push_to_hub")
    assert json.loads(hub.files["adapter_config.json"])["base_model_name_or_path"] == "openai-community/gpt2"
    assert hub.files["hfpg_config.yaml"] == Path(tmp_path, "pushed", "hfpg_config.yaml").read_bytes()
    assert 'from_pretrained("me/tiny-ppo")' in hub.files["README.md"].decode()

    # `hfpg push --merge` of the first folder: its base loads from where it lies, by its relative name
    monkeypatch.chdir(tmp_path / "models")
    assert main(["push", final, "me/tiny-merged", "--merge"]) == 0
    assert "config.json" in hub.files and not any(f.startswith("adapter_") for f in hub.files)
    assert_portable(hub.files, tmp_path, "hfpg push --merge upload")


def test_push_of_an_old_folder_rewrites_every_local_path(lora_trainer, tmp_path, monkeypatch, capsys):
    """A folder saved before paths were made portable (absolute paths in adapter_config.json, hfpg_config.yaml and
    tokenizer_config.json): the push uploads portable versions and leaves the folder as it is."""
    final = Path(lora_trainer.save_model(str(tmp_path / "old")))
    base = str(tmp_path / "models" / "my-base")
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("tokenizer_config.json", "name_or_path")):
        data = json.loads((final / name).read_text())
        data[key] = base
        (final / name).write_text(json.dumps(data))
    (final / "hfpg_config.yaml").write_text(yaml.safe_dump(lora_trainer.config.to_dict()))  # absolute output_dir
    before = folder_files(final)
    hub = FakeHub(monkeypatch)
    assert main(["push", str(final), "me/old"]) == 0
    assert folder_files(final) == before
    assert_portable(hub.files, tmp_path, "hfpg push upload")
    assert yaml.safe_load(hub.files["hfpg_config.yaml"])["output_dir"] == "run"


def test_the_readme_claim_about_local_paths_holds():
    text = " ".join(README.read_text().split())
    assert "local paths never go into a card" in text


# ---- B: bad input is one clear line, exit code 2 -------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A tiny recipe over local stand-ins: a causal LM, one without tokenizer files, a classifier, prompt files."""
    root = tmp_path_factory.mktemp("cli")
    tok = make_tokenizer()
    tiny_gpt2(tok).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    tiny_gpt2(tok).save_pretrained(root / "no-tokenizer")  # weights and config only
    torch.manual_seed(0)
    clf = GPT2ForSequenceClassification(
        GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2, num_labels=2)
    )
    clf.config.pad_token_id = tok.pad_token_id
    clf.save_pretrained(root / "classifier")
    tok.save_pretrained(root / "classifier")
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"text": f"{PROMPTS[i % 4]} {i}"}) + "\n")
    (root / "empty.jsonl").write_text("")
    (root / "my_rewards.py").write_text(REWARDS_PY)
    recipe = {
        "model": {"name_or_path": str(root / "gpt2")},
        "data": {"path": "json", "data_files": str(root / "prompts.jsonl"), "prompt_column": "text", "eval_size": 4},
        "report": {"samples_every": 1, "num_samples": 2, "plot": False},
        "rewards": [{"name": "length_penalty", "kwargs": {"target": 4}}],
        **small_run(root, max_steps=1),
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def train(fixtures, tmp_path, *overrides: str) -> int:
    """``hfpg train`` of the fixture recipe into a fresh run directory."""
    return main(["train", str(fixtures / "recipe.yaml"), f"output_dir={tmp_path / 'run'}", *overrides])


def one_line_error(capsys, *expected: str) -> str:
    """The one ``error: ...`` line that ends stderr (progress bars may come before it), with each ``expected``."""
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert err.endswith("\n") and last.startswith("error: ") and "Traceback" not in err, err
    assert err.count("error: ") == 1, err
    for text in expected:
        assert text in last, err
    return last


def test_override_that_is_not_valid_yaml(capsys):
    assert main(["config", "max_steps=[1"]) == 2
    one_line_error(capsys, "override 'max_steps=[1'", "not valid YAML", "quote it")


def test_unquoted_override_read_as_a_mapping_says_to_quote_it(fixtures, tmp_path, capsys):
    assert train(fixtures, tmp_path, "data.prompt_template=Q: {q}") == 2
    one_line_error(
        capsys, "data.prompt_template=", "as a mapping", "quote the value", "'data.prompt_template=\"Q: {q}\"'"
    )


def test_empty_data_file(fixtures, tmp_path, capsys):
    assert train(fixtures, tmp_path, f"data.data_files={fixtures / 'empty.jsonl'}") == 2
    one_line_error(capsys, "empty.jsonl is empty", "one JSON object per line")


def test_eval_size_larger_than_the_data(fixtures, tmp_path, capsys):
    assert train(fixtures, tmp_path, "data.eval_size=100") == 2
    one_line_error(capsys, "data.eval_size=100", "8 rows", "from 1 to 7")


def test_model_that_is_not_a_causal_lm(fixtures, tmp_path, capsys):
    assert train(fixtures, tmp_path, f"model.name_or_path={fixtures / 'classifier'}") == 2
    one_line_error(capsys, "GPT2ForSequenceClassification, not a causal language model", "rewards:")


@pytest.mark.parametrize("path", ["absolute", "./missing-model"])
def test_missing_model_folder_says_it_does_not_exist(fixtures, tmp_path, capsys, path):
    path = str(fixtures / "missing-model") if path == "absolute" else path
    assert train(fixtures, tmp_path, f"model.name_or_path={path}") == 2
    err = one_line_error(capsys, "model.name_or_path=", "missing-model does not exist")
    assert "Repo id" not in err


def test_model_folder_without_tokenizer_files(fixtures, tmp_path, capsys):
    assert train(fixtures, tmp_path, f"model.name_or_path={fixtures / 'no-tokenizer'}") == 2
    err = one_line_error(capsys, "could not load a tokenizer from", "no-tokenizer", "no tokenizer files")
    assert "prompt is empty" not in err


def test_eval_writes_its_own_file_never_the_runs_metrics(fixtures, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "objective/scores": 0.5}\n')
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["eval", str(fixtures / "recipe.yaml"), f"output_dir={run}"]) == 0
    out = capsys.readouterr()
    metrics = json.loads(out.out)
    assert metrics["eval/num_samples"] == 4
    assert (run / "metrics.jsonl").read_bytes() == before
    written = list(run.glob("eval-*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text()) == metrics
    assert f"hfpg: wrote {written[0]}" in out.err
    assert sorted(p.name for p in run.iterdir()) == sorted(["metrics.jsonl", written[0].name])
    # --output: that file, and nothing in the run directory
    target = tmp_path / "elsewhere" / "scores.json"
    assert main(["eval", str(fixtures / "recipe.yaml"), f"output_dir={run}", "--output", str(target)]) == 0
    assert json.loads(target.read_text())["eval/num_samples"] == 4
    assert len(list(run.iterdir())) == 2


def test_reward_returning_two_values_a_row_is_refused(fixtures, capsys):
    rewards = f"rewards=[{{name: '{fixtures / 'my_rewards.py'}:pairs'}}]"
    assert main(["eval", str(fixtures / "recipe.yaml"), rewards]) == 2
    one_line_error(capsys, "'pairs' must return one value per completion", "shape (4,)", "got an array of shape (2, 2)")


@pytest.mark.parametrize(
    "out, expected",
    [
        (torch.zeros(2, 2), r"got an array of shape \(2, 2\)"),
        (np.zeros((1, 4)), r"got an array of shape \(1, 4\)"),
        ([[0.0, 1.0], [2.0, 3.0]], r"got a nested list of shape \(2, 2\)"),
        ([[0.0], [1.0], [2.0], [3.0]], r"got a nested list of shape \(4, 1\)"),
    ],
    ids=["tensor", "numpy", "nested-list", "column-list"],
)
def test_check_outputs_never_flattens(out, expected):
    with pytest.raises(RewardError, match=r"one value per completion.*" + expected):
        check_outputs(out, "f", ["a", "b", "c", "d"])


def test_check_outputs_still_takes_one_value_per_completion():
    for out in (torch.arange(4.0), torch.arange(4.0)[:, None], np.arange(4.0), np.arange(4.0)[:, None], [0, 1, 2, 3]):
        scores, applicable = check_outputs(out, "f", ["a", "b", "c", "d"])
        assert scores.tolist() == [0.0, 1.0, 2.0, 3.0] and applicable.all()
