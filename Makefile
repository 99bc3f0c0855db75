# One entry point for set-up, the demo and the tests (README and .ci/run use these targets).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup redis-server demo test test-fast test-gpu lint
$(BIN)/recsys: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/recsys redis-server

# The tests start their own redis-server (127.0.0.1, a free port, no persistence; the shared
# live state of `recsys serve --redis`): installed from Debian where missing, never started here.
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { \
	    echo "redis-server is missing and apt-get is not here: install Redis (>= 6.2)"; exit 1; }; \
	  echo "installing redis-server (Debian package)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

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
