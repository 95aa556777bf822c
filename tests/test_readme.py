"""The README's Python example runs as written, with the Hub model swapped for a tiny local one (no network)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import tiny_gpt2

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tokenizer, tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert code.count('"gpt2"') == 2 and "max_steps=50" in code
    model_dir = tmp_path / "tiny-gpt2"
    tiny_gpt2(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    code = code.replace('"gpt2"', repr(str(model_dir))).replace("max_steps=50", "max_steps=2")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    out = tmp_path / "outputs" / "gpt2-excited"
    assert namespace["trainer"].global_step == 2
    assert (out / "value_head.safetensors").is_file() and (out / "hfpg_config.yaml").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
