# The targets are the words people type. Each one does its own set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench services clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: proxyd on the embedded defaults with the example config, a demo key and a local mock provider
run: install
	$(BIN)/python -m proxyd.demo

## services: start the local PostgreSQL and Redis the tests use, if they are down
services:
	@./scripts/services.sh

## test: lint-free code, the whole test suite against real PostgreSQL and Redis, a benchmark smoke run
test: install services
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check proxyd tests benchmarks
	$(BIN)/ruff format --check proxyd tests benchmarks
	$(BIN)/mypy proxyd tests benchmarks

bench: install services
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache .hypothesis
