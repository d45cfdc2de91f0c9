# rollfleet developer entry points. `make run` and `make test` create the venv they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
JOB    ?= examples/countdown.yaml

.PHONY: run test lint crds clean bench-async

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)  ## train the tiny model on the default job, every service a local process
	$(BIN)/rollfleet run $(JOB)

test: $(STAMP) lint  ## unit, service and end-to-end tests
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-async: $(STAMP)  ## asynchronous vs synchronous training, side by side (~15 min; benchmarks/RESULTS.md)
	$(BIN)/python benchmarks/async_speedup.py

crds: $(STAMP)  ## regenerate crds/ from src/rollfleet/spec.py
	$(BIN)/rollfleet crd > crds/rljob.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
