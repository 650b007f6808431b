# Capacity Platform. `make help` lists the targets.
SHELL := /usr/bin/env bash
.DEFAULT_GOAL := help
VENV_BIN = $(shell hack/dev-env | tail -n 1)

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: run
run: ## Run the platform: local control plane (unless KUBECONFIG is set), CRDs, example claims
	hack/run

.PHONY: test
test: ## Run every test (lint, types, unit, integration) with all set-up included
	hack/test

.PHONY: unit
unit: ## Lint, type check and unit tests only (no cluster)
	hack/test unit

.PHONY: lint
lint: ## ruff check and format check
	$(VENV_BIN)/ruff check . && $(VENV_BIN)/ruff format --check .

.PHONY: fmt
fmt: ## Format the code and apply safe ruff fixes
	$(VENV_BIN)/ruff format . && $(VENV_BIN)/ruff check --fix .

.PHONY: typecheck
typecheck: ## mypy (strict on capacity_api) and the import-layer contracts
	$(VENV_BIN)/mypy api/capacity_api node-agent/capacity_agent operator/capacity_operator cli/capacity_cli
	$(VENV_BIN)/lint-imports

.PHONY: crds
crds: ## Regenerate crds/ from the pydantic models
	$(VENV_BIN)/python -m capacity_api.crdgen crds/ --chart charts/capacity-platform

.PHONY: control-plane-up
control-plane-up: ## Start (or reuse) the local cluster (control plane, real node, kwok nodes)
	hack/control-plane up

.PHONY: control-plane-down
control-plane-down: ## Stop the local cluster and restore what it changed on the host
	hack/control-plane down

.PHONY: kind-up
kind-up: ## Create a kind cluster (Docker), build and load the image, helm install the chart
	hack/kind up

.PHONY: kind-down
kind-down: ## Delete the kind cluster
	hack/kind down

.PHONY: images
images: ## Build the images (platform, pause, testbox) from Debian packages and PyPI, cached
	hack/image build

.PHONY: tools
tools: ## Build the pinned Kubernetes binaries into the cache (kube-apiserver, kubelet, kwok, ...)
	hack/kube-tools ensure

.PHONY: bench
bench: ## Run our benchmarks in tests/bench (print figures, write JSON to tests/bench/results)
	@ls tests/bench/bench_*.py >/dev/null 2>&1 || { echo "no benchmarks yet"; exit 0; }
	for b in tests/bench/bench_*.py; do \
	  case $$b in */bench_kueue.py) continue;; esac; \
	  $(VENV_BIN)/python $$b || exit 1; \
	done

.PHONY: bench-kueue
bench-kueue: ## Kueue v0.17.0 (built once, cached) at our benchmark's rates, one table with ours
	$(VENV_BIN)/python tests/bench/bench_kueue.py
