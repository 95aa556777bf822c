# hfpg: every target works from a fresh clone. `make test` and `make demo` create the environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch is installed from the machine's local wheel; an unpinned torch would pull CUDA packages.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help venv install test test-slow test-all demo bench clean

help:
	@echo "make test       create .venv, install hfpg[dev], run the fast test suite"
	@echo "make test-slow  run the slow end-to-end tests only"
	@echo "make test-all   run every test"
	@echo "make demo       the offline demo (arrives with the recipes issue)"
	@echo "make bench      time each phase of a PPO step on a tiny model"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

venv install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.installed
	@echo "hfpg is installed in $(VENV)."
	@echo "The offline demo (SmolLM2-135M + LoRA PPO with a combined reward) arrives with issue 5 (recipes and the hfpg command)."
	@echo "Until then, run the README's Python example or 'make test'."

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_phases.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
