# `make test` and `make demo` work on a fresh machine: they create .venv and install tracer.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.toml

.PHONY: install test demo clean

$(BIN)/tracer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/tracer

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/tracer model pull
	$(BIN)/tracer run $(CONFIG) --force

clean:
	rm -rf $(VENV) .pytest_cache data/runs data/*.jsonl data/demo
