"""Test set-up for the experiments' own modules (importable through pytest.ini's ``pythonpath``): keep runs on CPU."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "1")
