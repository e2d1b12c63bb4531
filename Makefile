# Two set-up commands on a fresh machine with only Python 3.10+: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-gpu gpu-check lint install clean

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

# On any node: every GPU step the node allows (TensorRT installed where nvidia-smi shows a GPU), the rest reported
# as skipped with the reason; results in docs/gpu/<date>-<gpu>/. Ends by itself within its 540-s budget.
gpu-check: $(STAMP)
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q -e '.[gpu]' || \
		echo "could not install the [gpu] extra: the TensorRT steps will say why"; fi
	$(PY) -m fusionrank_cli.gpu_check

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
