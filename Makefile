# ctrlora — the README's commands. Everything runs inside .venv (created on first use).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch is pinned in every pip call so that pip never swaps in a multi-GB CUDA build.
TORCH := torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-dev run test bench lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" -e .
	# hydra/sweeper=optuna: hydra-optuna-sweeper 1.3.0 still pins optuna<3, though what it uses (the
	# distributions, ask/tell) is in the optuna 5 that pyproject requires: install it without its pins.
	$(PIP) install -q --no-deps hydra-optuna-sweeper==1.3.0
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q "$(TORCH)" -e ".[dev]"
	# curvlinops is a test-only oracle; its dependency backpack asks for torchvision only for
	# examples, and PyPI's torchvision does not load beside the pinned CPU torch: skip it.
	$(PIP) install -q "$(TORCH)" linear_operator==0.6.1 einops opt_einsum
	$(PIP) install -q --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 \
		einconv==0.1.0 unfoldNd==0.2.3
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: install
	$(PY) train.py $(ARGS)

# Two pytest workers on two cores: most tests are one-threaded Python and subprocess start-up
# (tests/conftest.py gives every test and its subprocesses one thread). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install-dev
	$(PY) -m pytest tests -n $(TEST_WORKERS) $(PYTEST_ARGS)

bench: install-dev
	$(PY) -m ctrlora.bench $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff check ctrlora tests scripts train.py
	$(VENV)/bin/ruff format --check ctrlora tests scripts train.py

clean:
	rm -rf runs outputs multirun .pytest_cache
