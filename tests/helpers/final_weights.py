"""Comparing the exported models of two runs."""

from pathlib import Path

import torch
from safetensors.torch import load_file


def assert_same_final_weights(first: Path, second: Path) -> None:
    """`final/base` and `final/swa` of two runs hold bit-identical tensors under the same names."""
    for which in ("base", "swa"):
        a = load_file(first / "final" / which / "model.safetensors")
        b = load_file(second / "final" / which / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{which}/{key}"
