# camid: two commands do all the set-up on a fresh machine.
#   make run   - make .venv, install, run the whole pipeline (dvc repro) on the embedded default data
#   make test  - same set-up, then the test suite (slow tests excluded; `make test-slow` runs them)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: install run test test-slow imagemagick chromium bench clean

# The C extension (camid/forensics/_dcscan.c) is compiled by this install: rebuild when it changes.
$(STAMP): pyproject.toml requirements.lock camid/forensics/_dcscan.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e .
	touch $(STAMP)

# The test extra adds pytest and pyspark (for the spark_udf test); `make run` does not need them.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(TEST_STAMP)

install: $(STAMP)

# ImageMagick's `identify` is the reference the JPEG-quality tests compare against.
imagemagick:
	@identify -version 2>/dev/null | grep -q ImageMagick || { \
	  echo "installing ImageMagick (reference for JPEG quality tests)"; \
	  SUDO=$$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq imagemagick >/dev/null; }

# Headless Chromium runs the browser tests of `camid ui` (Playwright drives it; it downloads no browser of its own).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Chromium (headless browser for the camid ui tests)"; \
	  SUDO=$$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

run: install
	source $(BIN)/activate && dvc repro
	@source $(BIN)/activate && camid register --summary

# The test files run on every core, at most 4 (pytest-xdist; a file's tests stay in one worker, which builds the
# session's shared fixtures for itself): on 2 cores the suite takes 10 min, not 16 in one process that leaves a core
# idle most of the time. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= auto
PYTEST_PARALLEL = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadfile)

test: $(TEST_STAMP) imagemagick chromium
	source $(BIN)/activate && python -m pytest $(PYTEST_PARALLEL)

test-slow: $(TEST_STAMP) imagemagick
	source $(BIN)/activate && python -m pytest -m slow $(PYTEST_PARALLEL)

bench: $(TEST_STAMP) imagemagick chromium
	source $(BIN)/activate && for b in bench/*.py; do python $$b; done

clean:
	rm -rf data models metrics plots mlruns mlflow.db .dvc/cache .dvc/tmp
