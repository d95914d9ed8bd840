# ivs-fanout — one broadcaster, a pool of IVS Real-Time Stages, a large real-time audience.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --warn-undefined-variables --no-builtin-rules
# A recipe that fails leaves no half-written target behind to look up to date next time.
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
SDK_VERSION := 1.41.0
SDK_JS := web/vendor/amazon-ivs-web-broadcast.js
PLAYER_VERSION := 1.56.1
PLAYER_DIR := web/vendor/ivs-player
PLAYER_JS := $(PLAYER_DIR)/amazon-ivs-player.js
PROTO_SRC := $(wildcard protos/fanout/v1/*.proto)

.PHONY: help setup system-deps run test lint proto check-proto bench k8s-check clean

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

$(SDK_JS):
	mkdir -p web/vendor .fanout/sdk
	cd .fanout/sdk && npm pack --silent amazon-ivs-web-broadcast@$(SDK_VERSION) >/dev/null
	tar -xzf .fanout/sdk/amazon-ivs-web-broadcast-$(SDK_VERSION).tgz -C .fanout/sdk
	cp .fanout/sdk/package/dist/amazon-ivs-web-broadcast.js $(SDK_JS)

# The IVS Player SDK plays the overflow tier (a channel's HLS). Its npm package is CommonJS with npm
# dependencies, so esbuild (from npm, pinned) bundles it into one script that defines window.IVSPlayer;
# its wasm worker files are served beside it.
$(PLAYER_JS):
	mkdir -p $(PLAYER_DIR) .fanout/player
	cd .fanout/player && echo '{"private": true}' > package.json && \
	  npm install --silent --no-audit --no-fund amazon-ivs-player@$(PLAYER_VERSION) bowser@2.13.1 \
	    lodash@4.17.21 events@3.3.0 util@0.12.5 esbuild@0.24.2 >/dev/null && \
	  echo "window.IVSPlayer = require('amazon-ivs-player');" > entry.js && \
	  ./node_modules/.bin/esbuild entry.js --bundle --minify --format=iife --platform=browser \
	    --define:process.env.NODE_ENV='"production"' --log-level=warning --outfile=player.js
	cp .fanout/player/node_modules/amazon-ivs-player/dist/assets/amazon-ivs-wasmworker.min.js \
	   .fanout/player/node_modules/amazon-ivs-player/dist/assets/amazon-ivs-wasmworker.min.wasm $(PLAYER_DIR)/
	cp .fanout/player/player.js $@

setup: $(BIN)/.installed $(SDK_JS) $(PLAYER_JS) ## Create the virtualenv, install pinned dependencies, vendor the IVS web SDK and player

# The tests drive a real Chromium, a real Prometheus and private redis-servers; all from Debian's packages.
system-deps: ## Install the Debian packages the tests and bench drive (chromium, prometheus, redis-server, wrk) if missing
	@missing=(); \
	command -v chromium >/dev/null 2>&1 || missing+=(chromium); \
	command -v promtool >/dev/null 2>&1 || missing+=(prometheus); \
	command -v redis-server >/dev/null 2>&1 || missing+=(redis-server); \
	command -v wrk >/dev/null 2>&1 || missing+=(wrk); \
	if [ $${#missing[@]} -gt 0 ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $${missing[*]}"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$${missing[@]}" >/dev/null; \
	  else \
	    echo "the tests need these Debian packages: $${missing[*]} (sudo apt-get install $${missing[*]})" >&2; exit 1; \
	  fi; \
	fi

proto: $(BIN)/.installed ## Regenerate the gRPC code from protos/
	PATH=$(BIN):$$PATH $(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
		--mypy_out=quiet:. --mypy_grpc_out=quiet:. $(PROTO_SRC)

check-proto: proto ## Fail if the generated gRPC code is stale (changed or not yet committed)
	@if [ -n "$$(git status --porcelain -- protos/)" ]; then \
	  git status --short -- protos/ >&2; \
	  echo "generated code in protos/ is stale or untracked: run 'make proto' and commit" >&2; exit 1; \
	fi

run: setup ## Start the whole system locally (IVS emulator, services, gateway, pages)
	$(PY) -m tools.run_local

test: setup system-deps ## Run every test (unit, integration, browser)
	$(PY) -m pytest -q

lint: setup ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy services gateway tools

# Options for tools.bench, e.g. make bench BENCH_ARGS="--no-storm --gateway-workers 2".
BENCH_ARGS ?=
bench: setup system-deps ## Measure viewer-token throughput and latency through the whole path
	$(PY) -m tools.bench $(BENCH_ARGS)

k8s-check: $(BIN)/.installed ## Build every Kustomize overlay offline and check hardening, wiring and monitoring
	$(PY) deploy/k8s/check.py

clean: ## Remove the virtualenv, local state and caches
	rm -rf $(VENV) .fanout web/vendor .pytest_cache .mypy_cache .ruff_cache
