"""Every shipped recipe parses and runs a couple of steps with tiny local stand-ins for its model, data and reward
models; the CLI's commands and error messages; the run directory's contents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS, tiny_gpt2, tiny_llama
from transformers import GPT2Config, GPT2ForSequenceClassification

from hfpg import ConfigError
from hfpg.cli import main
from hfpg.recipe import load_recipe
from hfpg.schema import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SMALL = [
    "max_steps=2",
    "rollout_batch_size=4",
    "mini_batch_size=2",
    "max_new_tokens=6",
    "min_new_tokens=0",
    "report.samples_every=1",
    "report.num_samples=2",
]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Tiny local replacements for everything the recipes would download or install."""
    from conftest import make_tokenizer

    root = tmp_path_factory.mktemp("stand_ins")
    tok = make_tokenizer()
    gpt2 = root / "gpt2"
    tiny_gpt2(tok).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    llama = root / "llama"
    tiny_llama(tok).save_pretrained(llama)
    tok.chat_template = CHAT
    tok.save_pretrained(llama)
    torch.manual_seed(0)
    clf = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=128,
            n_embd=32,
            n_layer=1,
            n_head=2,
            num_labels=2,
            pad_token_id=tok.pad_token_id,
            id2label={0: "NEGATIVE", 1: "POSITIVE"},
            label2id={"NEGATIVE": 0, "POSITIVE": 1},
        )
    )
    clf.save_pretrained(root / "classifier")
    make_tokenizer().save_pretrained(root / "classifier")
    torch.manual_seed(0)
    rm = GPT2ForSequenceClassification(
        GPT2Config(  # a one-output reward model, as `hfpg train-rm` writes
            vocab_size=len(tok),
            n_positions=128,
            n_embd=32,
            n_layer=1,
            n_head=2,
            num_labels=1,
            pad_token_id=tok.pad_token_id,
        )
    )
    rm.save_pretrained(root / "reward_model")
    make_tokenizer().save_pretrained(root / "reward_model")
    words = WORDS
    with open(root / "reviews.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": " ".join(words[i % 5 : i % 5 + 9]), "label": i % 2}) + "\n")
    for split in ("train", "validation"):
        with open(root / f"dialogs_{split}.jsonl", "w") as f:
            for i in range(12):
                f.write(
                    json.dumps(
                        {
                            "dialogue": f"#A#: hello world {words[i]}\n#B#: the cat sat",
                            "summary": f"A says hello about the {words[i]}",
                            "topic": "t",
                        }
                    )
                    + "\n"
                )
    return root


def overrides_for(name: str, root: Path, out: Path) -> list[str]:
    common = [*SMALL, f"output_dir={out}", "data.path=json", "data.name=null"]
    if name == "ppo_smollm2_sentiment":
        return [
            *common,
            f"model.name_or_path={root / 'llama'}",
            "model.gguf_file=null",
            "data.eval_size=4",
            f"rewards.1.kwargs.model={root / 'llama'}",
            "rewards.1.kwargs.model_kwargs=null",
        ]
    if name == "ppo_smollm2_reward_model":
        return [
            *common,
            f"model.name_or_path={root / 'llama'}",
            "model.gguf_file=null",
            "data.eval_size=4",
            f"rewards.0.kwargs.model={root / 'reward_model'}",
            f"rewards.2.kwargs.model={root / 'llama'}",
            "rewards.2.kwargs.model_kwargs=null",
        ]
    if name == "ppo_gpt2_sentiment":
        return [
            *common,
            f"model.name_or_path={root / 'gpt2'}",
            f"data.data_files={root / 'reviews.jsonl'}",
            "data.eval_size=4",
            "data.max_train_samples=16",
            f"rewards.0.kwargs.model={root / 'classifier'}",
            "adaptive_kl=false",
        ]
    if name == "ppo_gpt2_summarize_rouge":
        files = {"train": str(root / "dialogs_train.jsonl"), "validation": str(root / "dialogs_validation.jsonl")}
        return [
            *common,
            f"model.name_or_path={root / 'gpt2'}",
            f"data.data_files={json.dumps(files)}",
            "data.max_eval_samples=4",
            "stop_token_ids=null",
            "max_prompt_length=64",
        ]
    raise AssertionError(f"no stand-ins for recipe {name}: add them here")


def test_every_shipped_recipe_is_valid_as_written():
    assert len(RECIPES) >= 3
    for name in RECIPES:
        recipe = load_recipe(CONFIGS / f"{name}.yaml")
        assert recipe.training.rewards, name
        assert Path(ROOT / "recipes" / f"{name}.py").is_file(), f"recipe {name} has no script"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_on_tiny_stand_ins(name, stand_ins, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(CONFIGS / f"{name}.yaml"), *overrides_for(name, stand_ins, out)]) == 0
    printed = capsys.readouterr().out
    assert "report" in printed and str(out / "report.md") in printed
    for item in (
        "config.yaml",
        "metrics.jsonl",
        "samples.jsonl",
        "reward_kl.png",
        "report.md",
        "eval.json",
        "final/value_head.safetensors",
    ):
        assert (out / item).is_file(), item
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "objective/scores" in m] == [1, 2]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"prompt", "completion", "score"} <= set(samples[0])
    report = (out / "report.md").read_text()
    assert "| eval/scores |" in report and "## Samples" in report and "reward_kl.png" in report
    assert (out / "reward_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = load_recipe(out / "config.yaml")  # the saved config is itself a valid recipe
    assert resolved.training.max_steps == 2
    if load_recipe(CONFIGS / f"{name}.yaml").model.peft:
        assert (out / "final" / "adapter_config.json").is_file()


def test_recipe_pushes_its_final_model_with_a_card_naming_the_hub_base(stand_ins, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from test_hub import FakeHub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    hub = FakeHub().install(monkeypatch)
    name, out = "ppo_smollm2_sentiment", tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(CONFIGS / f"{name}.yaml"),
                *overrides_for(name, stand_ins, out),
                "push_to_hub=true",
                "hub_model_id=me/smol-positive",
            ]
        )
        == 0
    )
    assert "https://huggingface.co/me/smol-positive/commit/" in capsys.readouterr().out
    meta = hub.card().data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # model.hub_base_model, not the local path
    assert json.loads(hub.files["adapter_config.json"])["base_model_name_or_path"] == meta["base_model"]
    assert [(r["name"], r["weight"]) for r in meta["rewards"]] == [("positivity", 1.0), ("fluency", 0.05)]
    assert "eval/scores" in meta["final_metrics"] and "datasets" not in meta  # a local json file is no dataset id
    assert set(hub.files) == {str(p.relative_to(out / "final")) for p in (out / "final").rglob("*") if p.is_file()}


def test_refused_recipe_push_leaves_the_whole_run_directory(stand_ins, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    name, out = "ppo_gpt2_sentiment", tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(CONFIGS / f"{name}.yaml"),
                *overrides_for(name, stand_ins, out),
                "push_to_hub=true",
                "hub_model_id=me/gpt2-positive",
            ]
        )
        == 2
    )
    assert "no Hugging Face token found" in capsys.readouterr().err
    for item in ("report.md", "eval.json", "reward_kl.png", "final/model.safetensors", "final/README.md"):
        assert (out / item).is_file(), item


def test_recipe_script_runs_like_the_cli(stand_ins, tmp_path):
    name = "ppo_gpt2_sentiment"
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / f"{name}.py"),
            "--config",
            str(CONFIGS / f"{name}.yaml"),
            *overrides_for(name, stand_ins, out),
            "report_to=[]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report.md").is_file() and (out / "final" / "model.safetensors").is_file()


def test_eval_command_scores_a_trained_policy(stand_ins, tmp_path, capsys):
    name = "ppo_gpt2_sentiment"
    out = tmp_path / "run"
    assert main(["train", str(CONFIGS / f"{name}.yaml"), *overrides_for(name, stand_ins, out)]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(CONFIGS / f"{name}.yaml"),
                *overrides_for(name, stand_ins, tmp_path / "e"),
                "--model",
                str(out / "final"),
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["eval/num_samples"] == 4 and "eval/reward/positive/mean" in metrics


def test_eval_puts_a_trained_adapter_on_the_recipes_own_base(stand_ins, tmp_path, capsys):
    """The saved adapter names its base by Hub id (no local path may be saved), which cannot be fetched offline:
    `hfpg eval --model` attaches it to the base the recipe loads instead."""
    name = "ppo_smollm2_sentiment"
    out = tmp_path / "run"
    assert main(["train", str(CONFIGS / f"{name}.yaml"), *overrides_for(name, stand_ins, out)]) == 0
    base = json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a Hub id this offline machine cannot download
    capsys.readouterr()
    argv = ["eval", str(CONFIGS / f"{name}.yaml"), *overrides_for(name, stand_ins, tmp_path / "e")]
    assert main([*argv, "--model", str(out / "final"), "--output", str(tmp_path / "eval.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["eval/num_samples"] > 0 and json.loads((tmp_path / "eval.json").read_text()) == metrics


def test_recipes_command_lists_every_recipe(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in RECIPES:
        assert f"{name}.yaml" in out
    assert "Offline default" in out


def test_cli_errors_are_one_clear_message(tmp_path, capsys):
    recipe = CONFIGS / "ppo_gpt2_sentiment.yaml"
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", str(recipe), "lerning_rate=1", "model.nme_or_path=x", "rewards.0.name=blue"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'learning_rate'" in err and "did you mean 'model.name_or_path'" in err
    assert "unknown reward 'blue'; did you mean 'bleu'" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {name_or_path: x}\ndata: {path: json, data_files: missing.jsonl}\n"
        "rewards: [{name: missing_module_xyz:f}]\n"
    )
    assert main(["train", str(bad), f"output_dir={tmp_path / 'o'}"]) == 2
    assert "cannot import reward module 'missing_module_xyz'" in capsys.readouterr().err


def test_missing_data_file_and_column_are_clear_errors(stand_ins, tmp_path, capsys):
    name = "ppo_gpt2_sentiment"
    base = overrides_for(name, stand_ins, tmp_path / "o")
    assert main(["train", str(CONFIGS / f"{name}.yaml"), *base, f"data.data_files={tmp_path / 'none.jsonl'}"]) == 2
    assert "error: data:" in capsys.readouterr().err
    assert main(["train", str(CONFIGS / f"{name}.yaml"), *base, "data.prompt_column=review"]) == 2
    err = capsys.readouterr().err
    assert "data.prompt_column='review' is not a column" in err and "['text', 'label']" in err


def test_dotted_overrides():
    data = {"model": {"peft": None}, "rewards": [{"name": "bleu", "kwargs": {"a": 1}}]}
    apply_overrides(data, ["model.peft.r=8", "rewards.0.kwargs.a=2", "max_steps=3"])
    assert data == {"model": {"peft": {"r": 8}}, "rewards": [{"name": "bleu", "kwargs": {"a": 2}}], "max_steps": 3}
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(data, ["rewards.5.weight=1"])


def test_recipe_runs_are_reproducible(stand_ins, tmp_path, capsys):
    """Same recipe, same seed -> the same metrics, LoRA initialisation included."""
    name = "ppo_gpt2_summarize_rouge"  # a LoRA recipe: the adapter's random init must be seeded too
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert main(["train", str(CONFIGS / f"{name}.yaml"), *overrides_for(name, stand_ins, out), "report_to=[]"]) == 0
        runs.append([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()])
    keys = ("objective/scores", "objective/kl", "loss/policy", "eval/scores")
    for a, b in zip(runs[0], runs[1], strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}


def test_gguf_cache_from_an_older_hfpg_is_repaired_so_the_model_saves_and_merges(tmp_path, tokenizer):
    """Caches of de-quantised GGUF models once kept quantization_config={quant_method: gguf}; transformers then
    refused save_pretrained (and so merging an adapter) for plain fp32 weights."""
    from transformers import AutoModelForCausalLM

    from hfpg.sources import materialize_gguf

    cache = tmp_path / "gguf" / "pkg-model.Q4.gguf"
    tiny_llama(tokenizer).save_pretrained(cache)
    config = json.loads((cache / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "model.Q4.gguf", "dequantize": False}
    (cache / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not serializable"):  # the bug, reproduced
        AutoModelForCausalLM.from_pretrained(cache).save_pretrained(tmp_path / "out0")
    assert materialize_gguf(str(tmp_path / "pkg"), "model.Q4.gguf", cache_dir=str(tmp_path)) == str(cache)
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(cache).save_pretrained(tmp_path / "out1")
    assert (tmp_path / "out1" / "model.safetensors").is_file()
