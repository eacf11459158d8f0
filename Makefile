# pyflow — `make help` lists the targets.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# What `make run` meters and where it exports (override: make run ARGS='...')
ARGS  ?= --interface all --target 127.0.0.1:2055/ipfix
# Where `make run` listens with `pyflow collect` and prints each record ('' = no collector)
COLLECT ?= 127.0.0.1:2055
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' pyflow/__init__.py)
# The container engine `make image` uses: podman, else docker (override: make image ENGINE=docker)
ENGINE ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
# The Vagrant machine of `make vm` / `make vm-test`: bookworm (Linux 6.1) or jammy (5.15)
VM    ?= bookworm

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-18s\033[0m %s\n", $$1, $$2}'

setup: ## install everything (packages, kernel headers, collectors, venv); as root, idempotent
	bash scripts/setup.sh

$(STAMP):
	bash scripts/setup.sh

run: $(STAMP) ## set up if needed, meter all interfaces, IPFIX to 127.0.0.1:2055, print what arrives there
	@set -m 2>/dev/null; trap 'sleep 0.5; kill $$collector 2>/dev/null; wait $$collector 2>/dev/null' EXIT; \
	if [ -n "$(COLLECT)" ]; then \
	  echo "make run: printing the records that arrive at $(COLLECT) (pyflow collect; make run COLLECT= to skip)" >&2; \
	  $(VENV)/bin/pyflow collect --listen $(COLLECT) & collector=$$!; \
	fi; \
	$(VENV)/bin/pyflow run $(ARGS)

test: $(STAMP) lint ## set up if needed, then lint and run every test (unit, bpf, integration)
	$(PY) -m pytest tests

test-unit: $(STAMP) ## tests that need no root
	$(PY) -m pytest tests/unit

test-bpf: $(STAMP) ## the eBPF program through BPF_PROG_TEST_RUN (root)
	$(PY) -m pytest tests/bpf

test-integration: $(STAMP) ## network namespaces, real traffic, real collectors (root)
	$(PY) -m pytest tests/integration

test-fast: $(STAMP) ## every test but the slow ones (building and installing pyflow)
	$(PY) -m pytest tests -m 'not slow'

test-deploy: $(STAMP) ## packaging, Vagrantfile, Containerfile, Kubernetes and collector configs
	$(PY) -m pytest tests/unit/test_packaging.py tests/unit/test_deploy.py

dist: $(STAMP) ## build the sdist and the wheel into dist/ (the wheel carries bpf/ as pyflow/bpf)
	$(PY) -m build --outdir dist .

image: ## build the container image pyflow:VERSION with podman or docker (deploy/Containerfile)
	$(ENGINE) build -f deploy/Containerfile -t pyflow:$(VERSION) -t pyflow:latest .

vm: ## bring up the Vagrant VM (VM=bookworm or jammy), provisioned with make setup
	vagrant up $(VM)

vm-test: vm ## run the whole suite inside the Vagrant VM (VM=bookworm or jammy)
	vagrant ssh $(VM) -c 'cd /vagrant && sudo make test'

soak: $(STAMP) ## the reliability tests, long (about 25 min): churn, races, full cache, fuzzing (root)
	PYFLOW_CHURN_SECONDS=600 PYFLOW_CHURN_FLOWS=5000 PYFLOW_RACE_SECONDS=180 PYFLOW_RELIEF_SECONDS=180 \
	PYFLOW_FULL_SECONDS=120 PYFLOW_FUZZ_EXAMPLES=30000 \
	$(PY) -m pytest -s tests/bpf/test_reliability_race.py tests/bpf/test_reliability_relief.py \
	    tests/bpf/test_fuzz_parser.py tests/integration/test_reliability_full_cache.py \
	    tests/integration/test_reliability_churn.py
.PHONY: soak

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check pyflow tests bench
	$(VENV)/bin/mypy

bench: $(STAMP) bench-deps ## benchmarks; results go in docs/benchmarks.md
	$(PY) -m bench --write docs/benchmarks.md

bench-deps: ## install what the live benchmark uses (trafgen, fprobe, softflowd; services kept stopped)
	bash scripts/bench-deps.sh

clean: ## remove the venv, caches and built packages (not the Vagrant VMs: vagrant destroy)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info


.PHONY: bench-deps
.PHONY: help setup run test test-unit test-bpf test-integration test-fast test-deploy lint bench dist image vm vm-test clean
