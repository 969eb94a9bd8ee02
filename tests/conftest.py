"""Shared test setup: the repo root on sys.path, nothing fetched from the Hub, a private datasets cache.

tests/xla needs torch_xla and runs apart, in its own venv (`./run.sh test-xla`); elsewhere it is not collected.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

# `run.sh test` runs test files side by side, one worker per core: each worker trains in one thread, as the runs it
# launches do (OMP_NUM_THREADS=1). Two threads each oversubscribed the cores: an in-process Trainer test took 73 s
# beside a launched run against 9 s alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Where torch_xla is installed, accelerate trains every test on XLA; the main suite runs without it.
collect_ignore = [] if importlib.util.find_spec("torch_xla") else ["xla"]


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    """Keeps `datasets` caches of locally built test data out of the user's cache."""
    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
