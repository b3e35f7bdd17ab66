# The two commands: `make run` (default simulation) and `make test` (lint, then the suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SCENARIO ?= simulations/digits.toml
RUN_DIR  ?= runs/digits-default
PORT     ?= 8000

.PHONY: run lint test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch pinned first so pip takes the local CPU build, never a CUDA download
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# simulate; then serve the fused model behind an API key and query it over HTTP with the
# run's held-out test split (its accuracy must match the run's); then stop the server
run: $(STAMP)
	rm -rf $(RUN_DIR)
	$(BIN)/fedfuse simulate $(SCENARIO) --out $(RUN_DIR)
	key=$$($(BIN)/fedfuse keys create --file $(RUN_DIR)/api-keys.json --name make-run --quiet) && \
	{ $(BIN)/fedfuse serve $(RUN_DIR)/model --api-keys $(RUN_DIR)/api-keys.json --port $(PORT) & \
	  pid=$$!; trap 'kill $$pid; wait $$pid' EXIT; \
	  FEDFUSE_API_KEY=$$key $(BIN)/fedfuse query http://127.0.0.1:$(PORT) --run $(RUN_DIR) --wait 60; }

# ruff (style, import order, common bugs) and mypy (types) over the library; configured in
# pyproject.toml; `make test` runs it first, so a lint or type error fails CI
lint: $(STAMP)
	$(BIN)/ruff check fedfuse strategies
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# every benchmark, one after the other (about 30 min on 2 cores); each rewrites its table
# in docs/ and its JSON in simulations/bench/results/
bench: $(STAMP)
	$(BIN)/python simulations/bench/scale.py
	$(BIN)/python simulations/bench/secagg.py
	$(BIN)/python simulations/bench/deploy.py
	$(BIN)/python simulations/bench/privacy.py
	$(BIN)/python simulations/bench/fusion.py
	$(BIN)/python simulations/bench/serve.py

clean:
	rm -rf $(VENV) runs build *.egg-info
