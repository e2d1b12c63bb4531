# Two set-up commands on a fresh machine with only Python 3.10+: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-gpu lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/fusionrank demo

test: lint
	$(PY) -m pytest -m "not gpu" -q

test-all: test

test-gpu: $(STAMP)
	$(PY) -m pip install -q -e '.[gpu]'
	$(PY) -m pytest -m gpu -q

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
