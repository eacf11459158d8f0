# pyflow — `make help` lists the targets.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# What `make run` meters and where it exports (override: make run ARGS='...')
ARGS  ?= --interface all --target 127.0.0.1:2055/ipfix

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-18s\033[0m %s\n", $$1, $$2}'

setup: ## install everything (packages, kernel headers, collectors, venv); as root, idempotent
	bash scripts/setup.sh

$(STAMP):
	bash scripts/setup.sh

run: $(STAMP) ## set up if needed, then meter all interfaces, IPFIX to 127.0.0.1:2055
	$(VENV)/bin/pyflow run $(ARGS)

test: $(STAMP) lint ## set up if needed, then lint and run every test (unit, bpf, integration)
	$(PY) -m pytest tests

test-unit: $(STAMP) ## tests that need no root
	$(PY) -m pytest tests/unit

test-bpf: $(STAMP) ## the eBPF program through BPF_PROG_TEST_RUN (root)
	$(PY) -m pytest tests/bpf

test-integration: $(STAMP) ## network namespaces, real traffic, real collectors (root)
	$(PY) -m pytest tests/integration

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check pyflow tests bench
	$(VENV)/bin/mypy

bench: $(STAMP) ## benchmarks; results go in docs/benchmarks.md
	$(PY) -m bench

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info

.PHONY: help setup run test test-unit test-bpf test-integration lint bench clean
