# The two commands of the README: `make run` (the pipeline on the embedded model) and `make test`.
# Both set up .venv first (scripts/setup.sh; fast when already done).
SHELL := /bin/bash
VENV := .venv
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
CONFIG ?= configs/default.yaml

.PHONY: setup run test test-fast lint server serve compose-check

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

# The Prefect UI on this machine: `make serve` starts a local Prefect server (unless PREFECT_API_URL is set)
# and serves the deployments; `make server` starts only the server. See docs/orchestration.md.
server: setup
	$(OFFLINE) $(VENV)/bin/bvpo server

serve: setup
	$(OFFLINE) $(VENV)/bin/bvpo serve --config $(CONFIG)

# Validate docker-compose.yml (and the GPU overlay) without a Docker engine.
compose-check:
	@if docker compose version >/dev/null 2>&1; then dc="docker compose"; else dc=docker-compose; fi; \
	$$dc config -q && $$dc -f docker-compose.yml -f docker/compose.gpu.yml --profile gpu config -q && echo "compose: ok"
