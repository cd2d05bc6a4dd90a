PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test test-fast bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,bench]'
	npm ci --no-audit --no-fund --silent  # tus-js-client for tests/test_resumable.py (package-lock.json)

run: install
	$(BIN)/hypercorn --bind $(HOST):$(PORT) upload_asgi:app

# Two workers, each test module on one (its servers are started once): half the time on 2 cores.
test: install-test
	$(BIN)/python -m pytest -n 2 --dist loadscope --durations=15 $(PYTEST_ARGS)

test-fast: install-test
	$(BIN)/python -m pytest -n 2 --dist loadscope -m "not slow and not browser" $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) uploads .pytest_cache node_modules
