# Two commands do all the set-up on a fresh machine:
#   make demo   - installs (first use only) and runs the main job on the shipped demo zoo
#   make test   - installs (first use only) and runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_INDEX ?=

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so pip never resolves it through another package; TORCH_INDEX picks the index
	# (e.g. PyTorch's CPU index) where the configured one would give a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
	  || $(BIN)/python -m pip install -q torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
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
