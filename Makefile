# The targets are the words people type. Each one does its own set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lock run test lint bench soak services tools clean

install: $(STAMP)

# Exact versions from constraints.txt, the lock file (`make lock` refreshes it).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## lock: re-resolve pyproject.toml's dependencies at their newest allowed versions into constraints.txt
lock:
	PYTHON=$(PYTHON) ./scripts/lock.sh

## run: proxyd on the embedded defaults with the example config, a demo key and a local mock provider
run: install
	$(BIN)/python -m proxyd.demo

## services: start the local PostgreSQL and Redis the tests use, if they are down
services:
	@./scripts/services.sh

## tools: system tools the tests use (Debian's prometheus and systemd packages: promtool, systemd-analyze)
tools:
	@./scripts/test-tools.sh

## test: the whole suite against real PostgreSQL, Redis and Prometheus, with a benchmark smoke run
test: install services tools
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check proxyd tests benchmarks
	$(BIN)/ruff format --check proxyd tests benchmarks
	$(BIN)/mypy proxyd tests benchmarks
	$(BIN)/lint-imports

## bench: the benchmark suite (BASELINE=<commit> also measures that commit's proxyd beside this one)
bench: install services
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.run --profile $(if $(BASELINE),--baseline $(BASELINE))

## soak: ten minutes of mixed traffic through a real proxyd on loopback; RSS, fds, rows = admitted
soak: install
	$(BIN)/python -m benchmarks.soak --seconds 600

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache .hypothesis
