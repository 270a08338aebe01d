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

.PHONY: install test test-gpu train sample-data docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "$(TORCHSCALE_SPEC)"
	touch $(STAMP)

install: $(STAMP)

# The sample data (about 20 s to build) lets the tests that train on real shards run too.
# Most tests drive single-threaded trainer processes, so one pytest worker per core (each test
# file on one worker, sharing its fixtures) roughly halves the time on CI's 2 cores.
TEST_WORKERS ?= auto
test: install sample-data
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# docs/config.md from the config schemas (tests/test_config_docs.py fails when it is stale).
docs: install
	$(PY) -m retnet_train.config_docs

test-gpu: install
	$(PY) -m pytest -q -m gpu

# Train retnet_tiny on the sample data on CPU for a few minutes, report validation loss against
# the data's unigram entropy, and print a generated sample. Overrides: make train ARGS="trainer.max_steps=50".
# Started again, it resumes from (or, when finished, reports on) runs/tiny_cpu.
TRAIN_RUN ?= runs/tiny_cpu
train: install sample-data
	DS_ACCELERATOR=cpu $(PY) -m retnet_train experiment=tiny_cpu run_dir=$(TRAIN_RUN) $(ARGS)
	$(PY) -m retnet_train.train.report $(TRAIN_RUN)
	@echo "--- a sample (recurrent decoding after a chunkwise prefill) ---"
	DS_ACCELERATOR=cpu $(PY) -m retnet_train.generate checkpoint=$(TRAIN_RUN) prompt="def " max_new_tokens=80 temperature=0.7 seed=0

# Sample data for tests and `make train`: raw corpora made from Python's own stdlib text ->
# tokenizer -> 256-token shards, all in data/sample/.  Each step is skipped once done.
SAMPLE_SRC = pile='data/sample/raw/pile/*.jsonl.zst' c4='data/sample/raw/c4/*.json.gz' stack='data/sample/raw/stack/data/*/*.parquet'
sample-data: install
	@if [ -f data/sample/.complete ]; then echo "data/sample/ is complete"; else set -e; \
	  test -f data/sample/raw/.complete || { $(PY) -m data_prep sample data/sample/raw && touch data/sample/raw/.complete; }; \
	  test -f data/sample/tokenizer.model || $(PY) -m data_prep tokenizer --out data/sample/tokenizer.model --vocab-size 4096 $(SAMPLE_SRC); \
	  $(PY) -m data_prep shards --tokenizer data/sample/tokenizer.model --seq-len 256 --out data/sample/shards --workers 2 --shard-tokens 65536 --val-fraction 0.1 $(SAMPLE_SRC); \
	  touch data/sample/.complete; fi

clean:
	rm -rf $(VENV) .pytest_cache
