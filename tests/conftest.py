"""Test set-up: make ``src/`` importable and keep runs on CPU, quiet and small."""

import os
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Tiny tensors: one thread each avoids OpenMP spin-waits stalling when processes share the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when none is visible")
