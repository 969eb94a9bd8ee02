"""The own-loop example (recipes/own_loop.py): what every run of it must show, on 1 or 2 processes."""

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers.launch import ROOT

OWN_LOOP = ROOT / "recipes" / "own_loop.py"


def own_loop_args(out: Path, batch: int, *extra: str) -> list[str]:
    """5 epochs, averaging from epoch 2: the epoch-end snapshots of epochs 3, 4 and 5."""
    return ["--output_dir", str(out), "--epochs", "5", "--swa_start_epoch", "2", "--batch_size", str(batch), *extra]


def assert_averages_its_snapshots_and_recomputes_bn(out: Path, stdout: str, batch: int) -> None:
    accuracy = float(re.search(r"swa test accuracy (\d\.\d+)", stdout).group(1))
    assert accuracy > 0.85
    assert "swa phase lr 0.05" in stdout  # SWALR's constant rate, set on the user's own optimizer
    snapshots = [load_file(p) for p in sorted((out / "snapshots").glob("*.safetensors"))]
    assert len(snapshots) == 3  # the ends of epochs 3, 4 and 5 (averaging starts after epoch 2)
    averaged = load_file(out / "swa.safetensors")
    for name in snapshots[0]:
        mean = torch.stack([s[name].double() for s in snapshots]).mean(0)
        torch.testing.assert_close(averaged[name].double(), mean, atol=1e-6, rtol=0)
    # BN statistics are recomputed for the average (they are not any snapshot's): a real pass over the data.
    assert int(averaged["1.num_batches_tracked"]) == -(-1400 // batch)
    assert averaged["1.running_mean"].abs().sum() > 0
