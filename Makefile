# Every target that runs code depends on the virtual env; `make install` builds it once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev,data,train,eval]"
	# OpenFlamingo, for the import parity test and benchmarks only: it pins torch 2.0.1, so
	# it goes in without its dependencies (it runs on the ones above).
	$(BIN)/pip install --no-deps open-flamingo==2.0.1 einops-exts==0.0.4
	touch $(STAMP)

test: install
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: install
	$(BIN)/python -m demo.run

bench: install
	OMP_NUM_THREADS=2 $(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
