"""The product on the torch that TPU users have (torch_xla's, 2.9) without XLA: the core suite and a recipe.

accelerate trains on XLA whenever torch_xla imports; USE_TORCH_XLA=0 turns that off, so the same venv also
checks the plain CPU path on this torch.
"""

import os
import subprocess
import sys

import torch

from tests.helpers.launch import ROOT

CORE = ["tests/test_averaging.py", "tests/test_batchnorm.py", "tests/test_candidates.py", "tests/test_schedule.py",
        "tests/test_seeding.py", "tests/test_image_tensors.py", "tests/test_tpu_entry.py"]
WITHOUT_XLA = {**os.environ, "USE_TORCH_XLA": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TQDM_DISABLE": "1"}


def test_this_is_the_torch_that_torch_xla_needs():
    assert torch.__version__.startswith("2.9.")


def test_the_core_suite_passes_on_this_torch_without_xla():
    result = subprocess.run([sys.executable, "-m", "pytest", *CORE, "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                            env=WITHOUT_XLA, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout.splitlines()[-1] and "failed" not in result.stdout.splitlines()[-1]


def test_the_vision_recipe_runs_on_the_cpu_with_this_torch(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "vision" / "train.py"), "--config",
                             str(ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"), "--output_dir",
                             str(tmp_path / "run")], cwd=ROOT, env=WITHOUT_XLA, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final evaluation" in result.stdout
    assert (tmp_path / "run" / "final" / "swa" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "final" / "xla_counters.json").exists()  # (really not on XLA)
