"""The suite's one device fixture: every test that takes ``device`` runs once
on the CPU and once on CUDA (skipped without a CUDA device). The CUDA half
carries the ``cuda`` marker, so that on a GPU machine

    python -m pytest -q -m cuda tests

runs exactly it (benchmarks/gpu_check.sh does). tests/test_cuda_simt.py
emulates the CUDA kernels on the CPU: its items never get the marker."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: runs on the CUDA device (the device fixture's cuda half, and the "
        "CPU-vs-CUDA agreement tests); select with -m cuda")


@pytest.fixture(params=[
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda",
                 marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
])
def device(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name == "test_cuda_simt.py":
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)
