"""hfpg.schema: the one YAML -> dataclass loader behind PGConfig, recipes and reward-model configs."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from hfpg import ConfigError, PGConfig
from hfpg.recipe import load_recipe
from hfpg.reward_modeling import RMConfig
from hfpg.schema import apply_overrides, build, coerce, unknown_keys


def test_coerce_checks_each_member_of_a_union_in_order():
    assert coerce("eval_size", 16, "int | float") == (16, None)  # a row count stays an int
    assert coerce("eval_size", 0.25, "int | float") == (0.25, None)  # a fraction stays a float
    assert coerce("lr", "1e-5", "float") == (1e-5, None)  # YAML reads 1e-5 (no dot) as a string
    assert coerce("n", 3.0, "int") == (3, None)
    assert coerce("x", None, "int | None") == (None, None)
    assert coerce("report_to", "tensorboard", "list[str]") == (["tensorboard"], None)
    assert coerce("eval_size", "abc", "int | float") == (None, "eval_size='abc' must be an integer or a number")
    assert coerce("n", True, "int")[1] == "n=True must be an integer"  # a bool is never a number here
    assert coerce("n", None, "int")[1] == "n may not be null"
    assert coerce("peft", [1], "dict | None")[1] == "peft=[1] must be a mapping"


@dataclass
class _Section:
    size: int = 1
    name: str = "x"
    folder: str | None = field(default=None, metadata={"internal": True})


def test_build_reports_unknown_keys_and_bad_values_together_and_sets_internal_fields():
    obj, problems = build(_Section, {"sise": 2, "name": 3}, where="part")
    assert obj is None
    assert problems == ["unknown key 'part.sise'; did you mean 'part.size'?", "part.name=3 must be a string"]
    obj, problems = build(_Section, {"size": "4"}, folder="/here")
    assert problems == ["size='4' must be an integer"]
    obj, problems = build(_Section, {"size": 4.0}, folder="/here")
    assert problems == [] and (obj.size, obj.folder) == (4, "/here")
    assert build(_Section, {"folder": "/elsewhere"})[1][0].startswith("unknown key 'folder'")  # internal: not read
    assert unknown_keys(["zzz"], ["size"], "part.", "; see the docs") == ["unknown key 'part.zzz'; see the docs"]


def test_overrides_are_dotted_for_every_config_kind(tmp_path):
    data = {"rewards": [{"name": "bleu", "weight": 1.0}], "model": None}
    apply_overrides(data, ["rewards.0.weight=2", "model.name_or_path=gpt2", "max_steps=3"])
    assert data == {"rewards": [{"name": "bleu", "weight": 2}], "model": {"name_or_path": "gpt2"}, "max_steps": 3}
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["max_steps"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"rewards": [{"name": "bleu", "weight": 1.0}]}))
    cfg = PGConfig.from_yaml(path, ["rewards.0.weight=0.5"])  # PGConfig takes dotted overrides too
    assert cfg.rewards == [{"name": "bleu", "weight": 0.5}]


def test_base_dir_is_declared_set_by_the_loader_and_never_serialised(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 2\n")
    cfg = PGConfig.from_yaml(path)
    assert cfg.base_dir == str(tmp_path.resolve())
    assert (
        "base_dir" not in cfg.to_dict() and "base_dir" not in cfg.to_yaml() and "base_dir" not in PGConfig.field_names()
    )
    assert "base_dir" not in PGConfig.documented_yaml()
    assert cfg == PGConfig(max_steps=2)  # where a config was read from does not make it another config
    with pytest.raises(ConfigError, match="unknown key 'base_dir'"):
        PGConfig.from_dict({"base_dir": "/tmp"})


def test_recipe_sections_are_type_checked_like_the_training_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": "gpt2", "peft": "lora"},
                "data": {"path": "json", "eval_size": "many"},
                "report": {"samples_every": "often"},
                "max_steps": "ten",
            }
        )
    )
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert set(e.value.problems) == {
        "model.peft='lora' must be a mapping",
        "data.eval_size='many' must be an integer or a number",
        "report.samples_every='often' must be an integer",
        "max_steps='ten' must be an integer",
    }
    recipe = load_recipe(path, ["model.peft=null", "data.eval_size=8", "report.samples_every=2", "max_steps=3"])
    assert (recipe.data.eval_size, recipe.report.samples_every, recipe.training.max_steps) == (8, 2, 3)
    assert recipe.training.base_dir == str(tmp_path.resolve())


def test_reward_model_configs_load_through_the_same_loader(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"path": "json"}, "learning_rate": "2e-4"}))
    cfg = RMConfig.from_yaml(path, ["max_length=64"])
    assert cfg.learning_rate == 2e-4 and cfg.max_length == 64 and cfg.base_dir == str(tmp_path.resolve())
    with pytest.raises(ConfigError) as e:
        RMConfig.from_yaml(path, ["max_lenght=64", "objective=ranking"])
    assert e.value.problems == [
        "unknown key 'max_lenght'; did you mean 'max_length'?",
        "objective='ranking' is not one of ['pairwise', 'regression']",
    ]
