# The two commands of the README: `make serve` and `make test`. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# llama-cpp-python compiles llama.cpp on install (minutes): use every core. CMAKE_ARGS passes through, e.g.
# CMAKE_ARGS="-DGGML_CUDA=on" make serve builds it for an NVIDIA GPU.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: serve test system-packages lint bench-proxy bench-local bench-scheduler bench-limits bench-fleet bench-eta bench-eta-sim bench-replicas bench-batch clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.serve

serve: $(VENV)/.serve
	$(BIN)/llm-queue-gateway

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: system-packages lint
	$(BIN)/pytest

# promtool, chromium, chromedriver and redis-server, from Debian's packages when missing.
system-packages:
	.ci/system-packages

bench-scheduler: $(VENV)/.test
	$(BIN)/python -m bench.scheduler_bench $(ARGS)

bench-proxy: $(VENV)/.test
	$(BIN)/python -m bench.proxy_bench $(ARGS)

bench-limits: $(VENV)/.test
	$(BIN)/python -m bench.limits_bench $(ARGS)

bench-fleet: $(VENV)/.test
	$(BIN)/python -m bench.fleet_bench $(ARGS)

bench-eta: $(VENV)/.test
	$(BIN)/python -m bench.eta_bench $(ARGS)

bench-eta-sim: $(VENV)/.test
	$(BIN)/python -m bench.eta_sim $(ARGS)

bench-replicas: $(VENV)/.test
	$(BIN)/python -m bench.replicas_bench $(ARGS)

bench-batch: $(VENV)/.test
	$(BIN)/python -m bench.batch_bench $(ARGS)

bench-local: $(VENV)/.test
	$(BIN)/python -m bench.local_bench $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
