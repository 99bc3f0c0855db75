# One entry point for set-up, the demo and the tests (README and .ci/run use these targets).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast test-gpu lint
$(BIN)/recsys: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/recsys

demo: setup
	$(BIN)/recsys demo --out demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not slow"

# The CUDA paths, on a machine with a GPU (skipped, and said so, without one).
test-gpu: setup
	$(BIN)/pytest -m gpu -rs

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
