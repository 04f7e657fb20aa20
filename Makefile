# Every target that runs code depends on the virtual env; `make install` builds it once, from the
# lock (requirements/lock.txt: every package at an exact version, with its hashes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
LOCK_PYTHON := 3.11
EXTRAS := dev,data,train,eval,lmms-eval,docs
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2
# `make lock` re-resolves every pin to the newest release the ranges allow; `make lock
# LOCK_ARGS=` keeps the current pins and only adds what pyproject.toml now asks for.
LOCK_ARGS ?= --upgrade

.PHONY: install test lint format demo docs bench bench-gpu bench-gpu-wheels lock test-latest test-oldest test-pins check-java clean

install: $(STAMP)

$(STAMP): $(LOCK) requirements/reference.txt pyproject.toml
	@$(MAKE) --no-print-directory check-java
	@$(PYTHON) -c 'import sys; sys.exit(".".join(map(str, sys.version_info[:2])) != "$(LOCK_PYTHON)")' \
	  || echo "warning: $(LOCK) was made for Python $(LOCK_PYTHON), this is $$($(PYTHON) -V);" \
	     "pass PYTHON=python$(LOCK_PYTHON) or run make lock with yours" >&2
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION)
	$(BIN)/pip install -r $(LOCK)
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	# Reference implementations for the parity tests and benchmarks, without their dependencies
	# (OpenFlamingo pins torch 2.0.1 but runs on the locked stack).
	$(BIN)/pip install --no-deps -r requirements/reference.txt
	# DeepSpeed's C++ ops for this machine (the CPU accelerator's communication op, CPU Adam for
	# offload), built here with their progress shown rather than in silence inside a launched run
	timeout 900 $(BIN)/python -m flamingo.training.ops \
	  || echo "warning: DeepSpeed's ops did not build (above); the first DeepSpeed run builds them" >&2
	touch $(STAMP)

# The caption metrics' PTB tokenizer (pycocoevalcap) runs Java; better to say so here than to
# fail deep inside a test or the demo's evaluation.
check-java:
	@java -version >/dev/null 2>&1 || { \
	  echo "make install: Java is missing. The caption metrics (CIDEr, BLEU) tokenize with" \
	       "pycocoevalcap's PTB tokenizer, which runs Java: install a JRE (Debian/Ubuntu:" \
	       "sudo apt-get install -y default-jre-headless; any Java >= 8) and run make install again." >&2; \
	  exit 1; }

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

# The docs site (docs/, mkdocs.yml): built with --strict, then served at http://127.0.0.1:8000
docs: install
	$(BIN)/mkdocs build --strict
	$(BIN)/mkdocs serve

bench: install
	OMP_NUM_THREADS=2 $(BIN)/python -m bench

# The GPU bench (bench/gpu.py, <= 8 minutes on one H200). On the GPU machine, which has no venv
# and no network: `make bench-gpu` (or bash tools/bench_gpu.sh) with the .whl/ folder that
# `make bench-gpu-wheels` fills here carried along (deepspeed, open_clip, webdataset, ...).
bench-gpu:
	bash tools/bench_gpu.sh

bench-gpu-wheels: install
	bash tools/bench_gpu_wheels.sh

# Regenerate the lock from pyproject.toml's ranges (pip-tools, in its own throwaway env), held
# back only where requirements/hold.txt says why. Then run the suite on it: make test.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION)
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile --quiet $(LOCK_ARGS) \
	  --generate-hashes --allow-unsafe --all-build-deps --strip-extras \
	  --no-emit-index-url --no-emit-find-links \
	  $(foreach extra,$(subst $(comma), ,$(EXTRAS)),--extra $(extra)) \
	  --constraint requirements/hold.txt --output-file $(LOCK) pyproject.toml
	rm -rf .venv-lock

# The version matrix: the suite in a throwaway env at each end of the supported ranges.
test-latest:
	EXTRAS=$(EXTRAS) PYTHON=$(PYTHON) bash tools/matrix.sh latest

test-oldest:
	EXTRAS=$(EXTRAS) PYTHON=$(PYTHON) bash tools/matrix.sh oldest

# Any other point: make test-pins PINS="torch==2.11.0 torchvision==0.26.0 transformers==5.17.0"
test-pins:
	EXTRAS=$(EXTRAS) PYTHON=$(PYTHON) PINS="$(PINS)" bash tools/matrix.sh pins

clean:
	rm -rf $(VENV) .venv-lock .venv-matrix .pytest_cache .ruff_cache

comma := ,
