# The two commands of the README: `make run` (the pipeline on the embedded model) and `make test`.
# Both set up .venv first (scripts/setup.sh; fast when already done).
SHELL := /bin/bash
VENV := .venv
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
CONFIG ?= configs/default.yaml

.PHONY: setup run test test-fast lint

setup:
	@bash scripts/setup.sh

run: setup
	$(OFFLINE) $(VENV)/bin/bvpo run --config $(CONFIG)

test: setup
	$(OFFLINE) $(VENV)/bin/python -m pytest

test-fast: setup
	$(OFFLINE) $(VENV)/bin/python -m pytest -m "not e2e"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
