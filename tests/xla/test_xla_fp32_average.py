"""The average stays fp32 on XLA: exact where bf16 would round, and XLA's bf16 storage modes refused in one line."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.helpers.launch import ROOT
from tests.helpers.xla_launch import xla_launch

VISION = ROOT / "recipes" / "vision" / "train.py"
SMOKE = ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"

# Four updates of a weight 1 + k * 2^-16 (k = 1..4): their mean, 1 + 2.5 * 2^-16, needs 17 mantissa bits; bf16 has 8.
AVERAGE_ON_XLA = """
import torch, torch_xla
from swa_accel import MainProcessPlacement, WeightAverager
device = torch_xla.device()
model = torch.nn.Linear(1, 1, bias=False).to(device)
averager = WeightAverager(model, "swa", MainProcessPlacement(device))
for k in range(1, 5):
    with torch.no_grad():
        model.weight.fill_(1 + k * 2**-16)
    averager.update(model)
value = averager.averaged["weight"]
print(value.dtype, repr(value.cpu().item()))
"""
EXACT = 1 + 2.5 * 2**-16


def average_on_xla(env: dict) -> str:
    result = subprocess.run([sys.executable, "-c", AVERAGE_ON_XLA], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PJRT_DEVICE": "CPU", "PYTHONPATH": str(ROOT), **env}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]  # (torch_xla may print a deprecation line first)


def test_the_average_on_xla_is_exact_where_bf16_would_round():
    assert average_on_xla({}) == f"torch.float32 {EXACT!r}"
    # What the guard below prevents: with XLA_USE_BF16=1 the same tensor, still labelled float32, holds 1.0.
    assert average_on_xla({"XLA_USE_BF16": "1"}) == "torch.float32 1.0"


def test_xla_bf16_storage_is_refused_in_one_line_before_training(tmp_path):
    for variable in ("XLA_USE_BF16", "XLA_DOWNCAST_BF16"):
        out = tmp_path / variable
        result = xla_launch(VISION, ["--config", str(SMOKE), "--output_dir", str(out)], env={variable: "1"},
                            check=False)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: launch: {variable}=1 makes XLA store every float32 tensor as bf16, so the fp32 average would "
            "silently be bf16; unset it (mixed_precision: 'no' in the accelerate config) and train in bf16 with "
            "--model_dtype bfloat16, which keeps the average in fp32")
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_bf16_weights_on_xla_keep_an_fp32_average(tmp_path):
    """The way the error line points to: bf16 weights, an fp32 average holding values bf16 cannot."""
    out = tmp_path / "bf16"
    xla_launch(VISION, ["--config", str(SMOKE), "--output_dir", str(out), "--model_dtype", "bfloat16",
                        "--num_train_epochs", "2", "--swa_update_every_steps", "1", "--checkpointing_steps", "none",
                        "--plot", "false"])
    base = load_file(out / "final" / "base" / "model.safetensors")
    swa = load_file(out / "final" / "swa" / "model.safetensors")
    weight = next(k for k in swa if k.endswith("weight") and swa[k].ndim > 1)
    assert base[weight].dtype == torch.bfloat16 and swa[weight].dtype == torch.float32
    assert not torch.equal(swa[weight], swa[weight].bfloat16().float())  # more precision than bf16 holds
