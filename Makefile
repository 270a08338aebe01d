# Set-up and entry points. `make test` and `make train` work on a fresh clone that has only Python.
SHELL := /bin/bash
PYTHON ?= python3
# Use the active virtual environment if there is one, else a project-local .venv.
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
# The CPU build of torch; users on GPU clusters install their CUDA/ROCm torch before `make`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.retnet_train-installed
# torchscale is only the reference implementation for a parity test; its own pins are old,
# so it goes in without dependencies (the test stubs what the RetNet path does not use).
TORCHSCALE_SPEC ?= torchscale==0.3.0

.PHONY: install test test-gpu train sample-data clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "$(TORCHSCALE_SPEC)"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-gpu: install
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) .pytest_cache
