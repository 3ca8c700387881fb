# Two commands for a fresh machine: `make demo` and `make test`. Both create or update .venv idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Slow checks guard promises (multi-process training, resume, demo); CI runs them, a local `make test` skips them.
PYTEST_MARK := $(if $(CI),,-m "not slow")

.PHONY: demo test lint style install gpu-wheels

install: $(STAMP)

# torch first: a CPU wheel of 2.13.0 is on this kind of machine; letting pip pick torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,heif]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/finetune demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

style: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest $(PYTEST_MARK)

# Wheels a GPU machine whose Python has torch, peft, transformers and accelerate but not diffusers needs to run
# scripts/gpu_check.py (Python 3.12, x86-64); .whl/ is git-ignored. See README, Development.
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata torchao==0.18.0
