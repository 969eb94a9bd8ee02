"""What candidate averages cost: memory per candidate and the per-update cost with K candidates, in one run.

A later SWA start stores one copy of the running mean, once; it adds no work to `update`. A side EMA is one
more fp32 copy and one more `_foreach_lerp_` per update. This measures both on PreResNet-164 (CPU, fp32),
alternating the configurations so that machine noise hits them alike.

Usage:  .venv/bin/python benchmarks/bench_candidates.py [--updates 20] [--later_starts 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes.vision.models import PreResNet  # noqa: E402
from swa_accel import MainProcessPlacement, WeightAverager  # noqa: E402


def copy_bytes(averager: WeightAverager) -> int:
    copies = [averager.averaged, *averager.emas.values(), *(s for _, s in averager.starts.values() if s is not None)]
    return sum(t.numel() * t.element_size() for c in copies for t in c.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--later_starts", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = PreResNet(depth=164, num_classes=100)
    cpu = torch.device("cpu")
    configs = {
        "average only": WeightAverager(model, "swa", MainProcessPlacement(cpu)),
        f"+ {args.later_starts} later starts": WeightAverager(model, "swa", MainProcessPlacement(cpu)),
        "+ 2 side EMAs": WeightAverager(model, "swa", MainProcessPlacement(cpu), ema_decays=(0.9, 0.99)),
    }
    with_starts = configs[f"+ {args.later_starts} later starts"]
    for averager in configs.values():
        averager.update(model)  # binds, and makes later starts store a real copy
    for k in range(args.later_starts):
        with_starts.start_candidate(f"start_{k}")
    times = {name: [] for name in configs}
    for _ in range(args.updates + 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-4)
        for name, averager in configs.items():
            start = time.perf_counter()
            averager.update(model)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["average only"][2:])
    params = sum(p.numel() for p in model.parameters())
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "model": "PreResNet-164 (CIFAR-100 head)", "parameters": params,
        "configs": {name: {"update_ms": round(statistics.median(t[2:]) * 1e3, 2),
                           "update_ratio": round(statistics.median(t[2:]) / base, 3),
                           "copy_mib": round(copy_bytes(configs[name]) / 2**20, 1)}
                    for name, t in times.items()},
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
