# Two commands do all the set-up on a fresh machine:
#   make demo   - installs (first use only) and runs the main job on the shipped demo zoo
#   make test   - installs (first use only) and runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch from the local wheel cache; a plain `pip install torch` pulls CUDA builds.
	$(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m evomerge.demo

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -m "not gpu" tests

test-all: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
