"""Test set-up: keep runs on CPU, quiet and small (the project is installed: ``pipenv sync --dev``)."""

import os

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Tiny tensors: one thread each avoids OpenMP spin-waits stalling when processes share the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: more than about a second alone (a whole stage or training as a subprocess, "
                            "several processes, the studies); the fast tier, pytest -m 'not slow', leaves them out")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when none is visible")


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (stage-1 tests: two threads stall each other on a shared 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
