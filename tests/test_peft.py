"""PEFT policies: any adapter method from Python or YAML, saving what plain peft/transformers load, merging."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import AutoPeftModelForCausalLM, IA3Config, LoraConfig, PeftModel
from test_trainer import length_reward, make_trainer, params
from transformers import AutoModelForCausalLM

from hfpg import AutoModelForCausalLMWithValueHead, ConfigError, PGConfig, PGTrainer
from hfpg.modeling import VALUE_HEAD_FILE, peft_config_from_dict

PROBE = ["the cat sat on the mat", "hello world"]


def saved_base(tokenizer, tmp_path, builder=tiny_gpt2):
    """A base model saved to disk and loaded back, so adapter_config.json can name it (as a Hub id would be)."""
    path = tmp_path / "base"
    builder(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), AutoModelForCausalLM.from_pretrained(path)


def probe_batch(tokenizer):
    return tokenizer(PROBE, return_tensors="pt", padding=True)


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def trained_lora_trainer(tokenizer, tmp_path, base, **overrides):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora)
    trainer = make_trainer(
        tokenizer, tmp_path, model=model, max_steps=2, learning_rate=5e-2, reward=length_reward, **overrides
    )
    trainer.train()
    return trainer


def test_peft_config_argument_wraps_the_model_and_trains_adapter_and_value_head(tokenizer, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = PGTrainer(
        tiny_gpt2(tokenizer),
        tokenizer,
        PGConfig(output_dir=str(tmp_path), report_to=[], rollout_batch_size=4, mini_batch_size=2),
        train_dataset=[{"prompt": p} for p in PROBE],
        reward_fn=length_reward,
        peft_config=lora,
    )
    model = trainer.unwrapped_model
    assert model.is_peft_model and trainer.ref_model is None
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trainable = {name for name, p in model.named_parameters() if id(p) in in_optimizer}
    assert trainable and all("lora_" in n or n.startswith("v_head") for n in trainable), trainable
    assert {"v_head.summary.weight", "v_head.summary.bias"} <= trainable
    with pytest.raises(ValueError, match="already has a PEFT adapter"):
        PGTrainer(
            model,
            tokenizer,
            trainer.config,
            train_dataset=[{"prompt": "a"}] * 4,
            reward_fn=length_reward,
            peft_config=lora,
        )


def test_saved_adapter_loads_with_plain_peft_and_gives_identical_logits(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a local base is saved relative to the working directory (never an absolute path)
    base_path, base = saved_base(tokenizer, tmp_path)
    trainer = trained_lora_trainer(tokenizer, tmp_path, base)
    policy = trainer.unwrapped_model.eval()
    batch = probe_batch(tokenizer)
    expected = logits_of(policy, batch)
    out = trainer.save_model(str(tmp_path / "saved"))

    files = set(os.listdir(out))
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        VALUE_HEAD_FILE,
        "hfpg_config.yaml",
        "README.md",
    } <= files
    assert "model.safetensors" not in files  # only the adapter: the base is not duplicated
    assert json.loads(Path(out, "adapter_config.json").read_text())["base_model_name_or_path"] == os.path.relpath(
        base_path
    )

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out).eval()
    torch.testing.assert_close(logits_of(plain, batch), expected, rtol=0, atol=0)
    auto = AutoPeftModelForCausalLM.from_pretrained(out).eval()  # finds the base through adapter_config.json
    torch.testing.assert_close(logits_of(auto, batch), expected, rtol=0, atol=0)
    assert not torch.allclose(logits_of(AutoModelForCausalLM.from_pretrained(base_path), batch), expected)

    again = AutoModelForCausalLMWithValueHead.from_pretrained(out).eval()  # policy and value head back
    with torch.no_grad():
        a, b = again(**batch), policy(**batch)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    assert b.values.abs().sum() > 0  # the value head trained, so this compares something
    saved = PGConfig.from_yaml(os.path.join(out, "hfpg_config.yaml")).to_dict()
    assert saved == {**trainer.config.to_dict(), "output_dir": os.path.relpath(trainer.config.output_dir)}


def test_merged_save_loads_with_plain_transformers_and_leaves_the_policy_alone(tokenizer, tmp_path):
    _, base = saved_base(tokenizer, tmp_path)
    trainer = trained_lora_trainer(tokenizer, tmp_path, base, merge_adapter=True)
    policy = trainer.unwrapped_model.eval()
    batch = probe_batch(tokenizer)
    expected = logits_of(policy, batch)
    before = params(policy)
    out = trainer.save_model(str(tmp_path / "merged"))  # merge from config.merge_adapter

    files = set(os.listdir(out))
    assert "config.json" in files and "model.safetensors" in files and VALUE_HEAD_FILE in files
    assert not any(f.startswith("adapter_") for f in files)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, batch), expected, rtol=1e-5, atol=1e-5)
    # the policy keeps training as an adapter: merging worked on a copy
    assert policy.is_peft_model
    assert all(torch.equal(before[k], v) for k, v in params(policy).items())
    torch.testing.assert_close(logits_of(policy, batch), expected, rtol=0, atol=0)
    with_head = AutoModelForCausalLMWithValueHead.from_pretrained(out)
    assert not with_head.is_peft_model
    torch.testing.assert_close(with_head.v_head.summary.weight, policy.v_head.summary.weight)
    assert "library_name: transformers" in Path(out, "README.md").read_text()


@pytest.mark.parametrize(
    "spec",
    [
        {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        {"peft_type": "lokr", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    ],
    ids=["ia3", "loha", "lokr"],
)
def test_other_peft_methods_from_yaml_train_save_and_load_with_plain_peft(tokenizer, tmp_path, spec):
    base_path, base = saved_base(tokenizer, tmp_path, tiny_llama)
    config = peft_config_from_dict(spec)
    assert config.peft_type == spec["peft_type"].upper() and config.task_type == "CAUSAL_LM"  # str enums
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        model=AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=config),
        learning_rate=5e-2,
        reward=length_reward,
    )
    before = params(trainer.unwrapped_model)
    trainer.train()
    after = params(trainer.unwrapped_model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter_changed = {k for k in changed if not k.startswith("v_head")}
    assert adapter_changed and any(k.startswith("v_head") for k in changed)
    # the base weights (renamed ...base_layer.weight where an adapter wraps them) never move
    base_names = {f"pretrained_model.base_model.model.{k}" for k in tiny_llama(tokenizer).state_dict()}
    base_keys = {k for k in before if k.replace(".base_layer", "") in base_names}
    assert len(base_keys) == len(base_names)
    assert not changed & base_keys, changed & base_keys
    out = trainer.save_model(str(tmp_path / "saved"))
    batch = probe_batch(tokenizer)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out).eval()
    torch.testing.assert_close(
        logits_of(plain, batch), logits_of(trainer.unwrapped_model.eval(), batch), rtol=0, atol=0
    )
    assert f"- {spec['peft_type'].lower()}" in Path(out, "README.md").read_text()


def test_adalora_reallocates_ranks_after_optimizer_steps(tokenizer, tmp_path):
    spec = {
        "peft_type": "ADALORA",
        "init_r": 4,
        "target_r": 2,
        "target_modules": ["q_proj", "v_proj"],
        "tinit": 1,
        "tfinal": 1,
        "deltaT": 1,
        "total_step": 8,
    }
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        tiny_llama(tokenizer), peft_config=peft_config_from_dict(spec)
    )
    trainer = make_trainer(tokenizer, tmp_path, model=model, max_steps=2, reward=length_reward)
    assert trainer.num_optimizer_steps == 8
    peft_config = trainer.unwrapped_model.pretrained_model.active_peft_config
    assert peft_config.rank_pattern is None
    trainer.train()
    pattern = peft_config.rank_pattern  # set by update_and_allocate, which the trainer calls per optimizer step
    assert pattern and all(len(mask) == 4 for mask in pattern.values())
    assert sum(sum(mask) for mask in pattern.values()) < 4 * len(pattern)  # the budget pruned some ranks
    with pytest.raises(ConfigError, match="AdaLoRA needs"):
        make_trainer(
            tokenizer,
            tmp_path,
            model=AutoModelForCausalLMWithValueHead.from_pretrained(
                tiny_llama(tokenizer), peft_config=peft_config_from_dict(spec)
            ),
            algorithm="trpo",
            advantage_estimator="returns",
            baseline="leave_one_out",
            num_samples_per_prompt=2,
        )


def test_peft_yaml_mistakes_are_clear_errors():
    with pytest.raises(ConfigError, match=r"model.peft.lora_alhpa.*did you mean 'model.peft.lora_alpha'"):
        peft_config_from_dict({"r": 8, "lora_alhpa": 16})
    with pytest.raises(ConfigError, match=r"LORRA.*did you mean 'LORA'"):
        peft_config_from_dict({"peft_type": "LORRA"})
    with pytest.raises(ConfigError, match="prompt-learning"):
        peft_config_from_dict({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4})
    with pytest.raises(ConfigError, match="must be a mapping"):
        peft_config_from_dict("lora")
    assert isinstance(peft_config_from_dict(IA3Config(target_modules=["c_attn"], feedforward_modules=[])), IA3Config)


def test_prompt_learning_models_are_refused_with_the_reason(tokenizer):
    from peft import PromptTuningConfig, get_peft_model

    peft_model = get_peft_model(tiny_gpt2(tokenizer), PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="position ids"):
        AutoModelForCausalLMWithValueHead(peft_model)
