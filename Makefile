# Two set-up commands on a fresh machine with only Python 3.10+: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the tests run for real (Prometheus and promtool; shellcheck for the entrypoint; redis-server for
# the route's shared embedding cache), installed with apt-get when missing (CI runs as root).
SYSTEM_PACKAGES := prometheus shellcheck redis-server
# Images: `make image push REGISTRY=registry.example.com/ml TAG=0.1.0` (needs a Docker engine).
REGISTRY ?= registry.example.com/ml
TAG ?= 0.1.0
RELEASE := deploy/triton-release.yaml
release = $(shell sed -n 's/^$(1): *"\{0,1\}\([^"]*\)"\{0,1\} *$$/\1/p' $(RELEASE))
TRITON_DIGEST ?= $(call release,digest)
BUILD = docker build -f deploy/Dockerfile --build-arg TRITON_DIGEST=$(TRITON_DIGEST) \
	$(if $(RANKER_CHECKPOINT),--build-arg RANKER_CHECKPOINT=$(RANKER_CHECKPOINT))

.PHONY: demo test test-unit test-integration test-deploy test-all test-gpu gpu-check lint install system-deps deploy-render image push pin-triton clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	@missing=""; for tool in prometheus promtool shellcheck redis-server; do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $(SYSTEM_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(SYSTEM_PACKAGES) >/dev/null; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/fusionrank demo

# Every test but the GPU ones (CI: .ci/run). The tiers alone: test-unit is the fast loop (no server, no trained
# model), test-integration starts real tritonserver / redis-server and trains and exports the CI models (with the
# fuzzers of tests/robustness), test-deploy checks images, Kubernetes, monitoring and the wheel.
test: lint system-deps
	$(PY) -m pytest -m "not gpu" -q

test-unit: lint
	$(PY) -m pytest tests/unit -q

test-integration: $(STAMP) system-deps
	$(PY) -m pytest tests/integration tests/robustness -m "not gpu" -q

test-deploy: $(STAMP) system-deps
	$(PY) -m pytest tests/deploy -m "not gpu" -q

test-all: test

test-gpu: $(STAMP)
	$(PY) -m pip install -q -e '.[gpu]'
	$(PY) -m pytest -m gpu -q

# Generated deployment files: the PrometheusRule (from deploy/monitoring/rules.yml) and the rendered overlays.
deploy-render: $(STAMP)
	$(VENV)/bin/fusionrank deploy-render

image:
	@test -n "$(TRITON_DIGEST)" || { echo "$(RELEASE) has no digest: run 'make pin-triton' where nvcr.io is reachable"; exit 1; }
	$(BUILD) --target serve -t $(REGISTRY)/fusionrank:$(TAG) .
	$(BUILD) --target engine-builder -t $(REGISTRY)/fusionrank-engine-builder:$(TAG) .

push: image
	docker push $(REGISTRY)/fusionrank:$(TAG)
	docker push $(REGISTRY)/fusionrank-engine-builder:$(TAG)

# Resolves the release's tag to its digest once and records it in deploy/triton-release.yaml.
pin-triton:
	digest=$$(docker buildx imagetools inspect $(call release,image):$(call release,tag) \
	  --format '{{json .Manifest.Digest}}' | tr -d '"') && test -n "$$digest" && \
	sed -i "s/^digest: .*/digest: \"$$digest\"/" $(RELEASE) && echo "pinned $$digest"

# On any node: the driver first, a lean .venv-gpu (serving and gpu extras, never [dev]), every GPU step the node
# allows, the rest reported as skipped with the reason; results in docs/gpu/<date>-<gpu>/. One command that ends
# by itself within 10 minutes, install included (deploy/gpu-check.sh; runbook: docs/gpu.md).
gpu-check:
	bash deploy/gpu-check.sh

clean:
	rm -rf $(VENV) .venv-gpu .cache .pytest_cache .ruff_cache
