"""Measures, in one run on this machine, the two costs SWA adds, as ratios.

1. Per-update cost of `WeightAverager.update` vs `torch.optim.swa_utils.AveragedModel.update_parameters`
   on the vision model (PreResNet-164, CPU, fp32).
2. Training-time ratio SWA vs plain training on the default recipe (digits, SmallCNN), with the BN
   recompute and evaluation passes reported separately.

Usage:  .venv/bin/python benchmarks/bench_swa.py [--updates 30] [--repeats 2] [--out benchmarks/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes.vision.models import PreResNet  # noqa: E402
from swa_accel import MainProcessPlacement, WeightAverager  # noqa: E402


def time_updates(update, model, n: int) -> float:
    """Median seconds of one update, after two warm-up calls; weights nudged between calls."""
    times = []
    for i in range(n + 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-4)
        start = time.perf_counter()
        update(model)
        elapsed = time.perf_counter() - start
        if i >= 2:
            times.append(elapsed)
    return statistics.median(times)


def bench_updates(n: int) -> dict:
    torch.manual_seed(0)
    model = PreResNet(depth=164, num_classes=100)
    ours = WeightAverager(model, "swa", MainProcessPlacement(torch.device("cpu")))
    theirs = AveragedModel(model)
    ours_s = time_updates(ours.update, model, n)
    theirs_s = time_updates(theirs.update_parameters, model, n)
    return {"model": "PreResNet-164 (CIFAR-100 head)", "parameters": sum(p.numel() for p in model.parameters()),
            "tensors": len(list(model.parameters())), "updates_timed": n,
            "ours_ms": round(ours_s * 1e3, 3), "averaged_model_ms": round(theirs_s * 1e3, 3),
            "speedup": round(theirs_s / ours_s, 2)}


def run_recipe(out: Path, *overrides: str) -> dict:
    command = [sys.executable, str(ROOT / "recipes/vision/train.py"), "--config",
               str(ROOT / "recipes/vision/configs/digits_small_cnn.yaml"), "--output_dir", str(out),
               "--checkpointing_steps", "None", "--plot", "false", *overrides]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, capture_output=True, env=env, cwd=ROOT)
    return json.loads((out / "final" / "timings.json").read_text())


def training_only(t: dict) -> float:
    return t["total"] - t.get("evaluation", 0) - t.get("bn_recompute", 0) - t.get("checkpointing", 0)


def swa_added(swa: dict, plain: dict) -> float:
    extra_eval = max(0.0, swa.get("evaluation", 0) - plain.get("evaluation", 0))
    return swa.get("averaging_updates", 0) + swa.get("bn_recompute", 0) + extra_eval


def bench_training(repeats: int) -> dict:
    """Alternates plain and SWA runs `repeats` times and keeps each one's fastest run, to damp machine noise."""
    plains, swas = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            plains.append(run_recipe(Path(tmp) / f"plain{i}", "--swa_method", "none"))
            swas.append(run_recipe(Path(tmp) / f"swa{i}"))
    plain, swa = min(plains, key=training_only), min(swas, key=training_only)

    return {
        "recipe": "recipes/vision/configs/digits_small_cnn.yaml (40 epochs, eval every epoch, no checkpoints)",
        "repeats": repeats, "training_only_s_all_runs": {"plain": [round(training_only(t), 2) for t in plains],
                                                          "swa": [round(training_only(t), 2) for t in swas]},
        "plain_total_s": round(plain["total"], 2), "swa_total_s": round(swa["total"], 2),
        "total_ratio": round(swa["total"] / plain["total"], 3),
        "plain_training_only_s": round(training_only(plain), 2), "swa_training_only_s": round(training_only(swa), 2),
        "training_only_ratio": round(training_only(swa) / training_only(plain), 3),
        # Wall-clock ratios above swing with machine load; this one is measured inside a single SWA run:
        # the time SWA adds (averaging updates + BN recompute + evaluating the second model) over its training time.
        "swa_added_s": round(swa_added(swa, plain), 2),
        "swa_added_fraction_of_training": round(swa_added(swa, plain) / training_only(swa), 3),
        "swa_averaging_updates_s": round(swa.get("averaging_updates", 0), 4),
        "swa_bn_recompute_s": round(swa.get("bn_recompute", 0), 2),
        "plain_evaluation_s": round(plain.get("evaluation", 0), 2), "swa_evaluation_s": round(swa.get("evaluation", 0), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="plain/SWA training runs, alternated")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    args = parser.parse_args()
    result = {
        "command": "python benchmarks/bench_swa.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "per_update": bench_updates(args.updates),
        "training": bench_training(args.repeats),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
