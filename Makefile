# llorch-kit — one entry point for people and CI.
#   make lab       bring up the local podman lab and print the cluster state
#   make test      every lint and test there is (what CI runs)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export ANSIBLE_ROLES_PATH := $(CURDIR)/roles

.PHONY: help venv lint sanity test unit molecule lab lab-down bench system-deps engine chaos

help:
	@echo "make lab        bring up the podman lab (1 control host, 2 GPU nodes) and print its state"
	@echo "make lab-down   remove the lab"
	@echo "make chaos      fault scenarios on the running lab under client load, one table (CHAOS_ARGS=--help)"
	@echo "make test       lint + pytest + molecule (what CI runs)"
	@echo "make unit       pytest only;  make lint  linters only;  make molecule  molecule only"
	@echo "make sanity     ansible-test sanity on the built collection (part of make lint)"
	@echo "make bench      run the benchmarks in bench/ (prints figures)"
	@echo "make engine     build llama.cpp's llama-server once (cached outside the clone), print its archive"

venv: $(VENV)/.stamp

$(VENV)/.stamp: requirements.txt
	bash scripts/system-deps.sh  # python3-venv first: a fresh Debian 12 lacks it
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

system-deps:
	bash scripts/system-deps.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint -q
	$(MAKE) --no-print-directory sanity

# ansible-test sanity on what users install: the collection is built and installed into a temporary
# collections path, and every test that needs no container runs there. ansible-test keeps one venv per
# test under ~/.ansible/test/venv (outside the clone, so a second run reuses them). Its pip bootstrap
# script is downloaded from ci-files.testing.ansible.com; tests/sanity/get_pip.py stands in for it where
# that host cannot be reached.
ANSIBLE_TEST_CACHE := $(HOME)/.ansible/test/cache
sanity: venv
	@pip_version=$$(grep -oP "pip='\K[0-9.]+" $(VENV)/lib/python3*/site-packages/ansible_test/_internal/python_requirements.py); \
	get_pip="$(ANSIBLE_TEST_CACHE)/get_pip_$${pip_version//./_}.py"; \
	if [[ ! -s "$$get_pip" ]]; then mkdir -p "$(ANSIBLE_TEST_CACHE)"; cp tests/sanity/get_pip.py "$$get_pip"; fi; \
	work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	$(BIN)/ansible-galaxy collection build --output-path "$$work" . >/dev/null; \
	$(BIN)/ansible-galaxy collection install --force -p "$$work" "$$work"/llorch-kit-*.tar.gz >/dev/null; \
	cd "$$work/ansible_collections/llorch/kit" && $(CURDIR)/$(BIN)/ansible-test sanity --venv --python 3.11 --requirements --color no

# llama.cpp's llama-server from the pinned llama-cpp-python sdist: minutes the first time on a machine,
# then found in the cache (${LLORCH_ENGINE_CACHE:-~/.cache/llorch-kit/engine}) in milliseconds. The
# tests run the real engine, so `unit` needs it. LLORCH_ENGINE_CUDA=1 builds the CUDA flavor (docs/engine.md).
engine: venv
	@bash scripts/build-engine.sh

unit: venv engine
	$(BIN)/pytest -q tests

molecule: venv engine
	@for scenario in $$(ls molecule 2>/dev/null); do \
	  echo "== molecule test -s $$scenario"; \
	  $(BIN)/molecule test -s $$scenario || exit 1; \
	done

# system-deps first, so `make test` alone sets up a fresh Debian 12 machine (podman, debootstrap, ...).
test: system-deps lint unit molecule

# The lab's nodes run llama-server: the archive is built (or found in the cache) first.
lab: venv engine
	bash lab/up.sh

lab-down:
	bash lab/down.sh

# Fault scenarios against the lab `make lab` brought up, under client load through the gateway; prints one
# table and fails on any failed row (docs/chaos.md). CHAOS_ARGS: scenario names, --away-s, --rate, --swarm;
# --no-lab runs only the HA rows (two replicas on a throwaway PostgreSQL on loopback), without the lab.
chaos: venv
	$(BIN)/python lab/chaos/run.py $(CHAOS_ARGS)

# Every script runs, even after one fails (bench/gateway.py exits 1 where the machine cannot keep its rate).
bench: venv
	@failed=(); for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script || failed+=("$$script"); done; \
	if (( $${#failed[@]} )); then echo "failed: $${failed[*]}"; exit 1; fi
