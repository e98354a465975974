# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fleet lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check dispatcher tests benchmarks examples
	$(BIN)/ruff format --check dispatcher tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

# Only the tests of several daemons sharing one Redis (they run in `make test` too).
test-fleet: $(STAMP)
	$(BIN)/pytest -q -m fleet

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/dispatcher bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
