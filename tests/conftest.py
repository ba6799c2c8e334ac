"""The suite's one device fixture: every test that takes ``device`` runs once
on the CPU and once on CUDA (skipped without a CUDA device). The CUDA half
carries the ``cuda`` marker, so that on a GPU machine

    python -m pytest -q -m cuda tests

runs exactly it (benchmarks/gpu_check.sh does). tests/test_cuda_simt.py
emulates the CUDA kernels on the CPU: its items never get the marker, run
last, and its kernel libraries start compiling when collection ends.

It also puts this checkout's root first on sys.path, the suite's one place
for it: ``import fusedbn`` then loads the package (and its compiled _C)
beside these tests, whatever the working directory and whatever copy an
editable install points at. The shared samples, references and the one
tolerance rule (``assert_close``) live in tests/helpers.py."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

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


def _is_simt(item):
    return item.path.name == "test_cuda_simt.py"


def pytest_collection_modifyitems(config, items):
    # The SIMT tests last: their kernel libraries compile meanwhile (below).
    items.sort(key=_is_simt)
    for item in items:
        if _is_simt(item):
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)


def pytest_collection_finish(session):
    simt = [item for item in session.items if _is_simt(item)]
    if simt and not session.config.option.collectonly:
        simt[0].module.start_builds(simt)
