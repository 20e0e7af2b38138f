"""Test set-up: without a GPU, the Triton kernels run on CPU tensors in the
Triton interpreter, which must be switched on before triton is first imported."""

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# kernels run here: the GPU when there is one, else CPU tensors in the interpreter
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # a different but reproducible draw per test
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
