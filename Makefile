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

.PHONY: help venv lint test unit molecule lab lab-down bench system-deps

help:
	@echo "make lab        bring up the podman lab (1 control host, 2 GPU nodes) and print its state"
	@echo "make lab-down   remove the lab"
	@echo "make test       lint + pytest + molecule (what CI runs)"
	@echo "make unit       pytest only;  make lint  linters only;  make molecule  molecule only"
	@echo "make bench      run the benchmarks in bench/ (prints figures)"

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

unit: venv
	$(BIN)/pytest -q tests

molecule: venv
	@for scenario in $$(ls molecule 2>/dev/null); do \
	  echo "== molecule test -s $$scenario"; \
	  $(BIN)/molecule test -s $$scenario; \
	done

# system-deps first, so `make test` alone sets up a fresh Debian 12 machine (podman, debootstrap, ...).
test: system-deps lint unit molecule

lab: venv
	bash lab/up.sh

lab-down:
	bash lab/down.sh

bench: venv
	@for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script; done
