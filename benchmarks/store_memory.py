"""Peak resident memory of a run's candidates: today's copies against the snapshot store, at a model size where the
copies matter (about 100M fp32 parameters on the CPU), each mode in a fresh process.

    .venv/bin/python benchmarks/store_memory.py [--width 4096 --layers 6 --epochs 16]

Modes (a plain SGD loop with `SWA`, 2 optimizer steps per epoch, averaging at each epoch end from epoch 1):
- `plain`: the SWA average alone;
- `copies`: 15 later starts (every epoch) and 5 side EMAs, one fp32 copy each (what a run had before the store);
- `store`: the same 15 starts as windows of the store, post-hoc EMA (2 tracked widths, 5 reconstructed), LAWA
  over 1, 3, 5 points and BEMA; what stays in memory is the average and 4 tracking copies.
Each prints its peak RSS (ru_maxrss) after training and after building one candidate of each kind, the seconds
of each, and the store's size on disk (in a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "plain": {},
    "copies": {"swa_start_candidates": "every_epoch", "ema_decays": "0.9,0.95,0.99,0.995,0.999"},
    "store": {"swa_start_candidates": "every_epoch", "snapshot_every": "every_epoch", "lawa_ks": "1,3,5",
              "bema": True},
}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_mode(mode: str, width: int, layers: int, epochs: int) -> dict:
    import torch
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from swa_accel import SWA, SWAArguments

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    loader = DataLoader(TensorDataset(torch.randn(8, width)), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    baseline = peak_mb()
    with tempfile.TemporaryDirectory() as folder:
        args = SWAArguments(swa_start_epoch=1, swa_lr=1e-4, **MODES[mode])
        swa = SWA(accelerator, model, optimizer, loader, args, num_epochs=epochs, store_dir=folder, verbose=False)
        start = time.perf_counter()
        for _ in range(epochs):
            for (x,) in loader:
                model(x).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
                swa.step()
        trained = time.perf_counter() - start
        after_training = peak_mb()
        names = swa.averager.candidate_names()
        # One candidate of each kind built, as the end's scoring builds them (one at a time): a later start, a side
        # EMA or a store family. (Every post-hoc EMA width reads every tracked snapshot: 32 files of 400 MB here.)
        kinds = {}
        for name in names:
            kinds[name.rsplit("_", 1)[0]] = name  # (the last of each: the shortest window, the slowest EMA)
        build_start = time.perf_counter()
        for name in kinds.values():
            tensors = swa.averager.candidate_tensors(name)
            del tensors
        built = time.perf_counter() - build_start
        return {"mode": mode, "parameters": parameters, "candidates": len(names),
                "peak_rss_mb_before_swa": round(baseline), "peak_rss_mb_after_training": round(after_training),
                "peak_rss_mb_after_building_one_of_each_kind": round(peak_mb()), "built": sorted(kinds.values()),
                "building_seconds": round(built, 1), "training_seconds": round(trained, 1),
                "store_disk_mb": round(sum(p.stat().st_size for p in Path(folder).iterdir()) / 2 ** 20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--mode", choices=list(MODES), default=None, help="one mode, in this process")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args.width, args.layers, args.epochs)))
        return
    for mode in MODES:
        result = subprocess.run([sys.executable, __file__, "--mode", mode, "--width", str(args.width), "--layers",
                                 str(args.layers), "--epochs", str(args.epochs)], capture_output=True, text=True,
                                check=True, cwd=ROOT)
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
