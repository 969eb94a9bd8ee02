"""Does a capped BN recompute change the averaged model's accuracy? Capped passes vs a full pass.

Takes a finished run (its `final/swa` weights and the same recipe arguments), recomputes the BN
statistics of those weights over a full pass of the training split and over `--caps` random
subsets (a few seeded permutations each, as the loop draws them), and scores every version on the
evaluation split. It also times one pass of each size, for the cost side.

Usage:
  python benchmarks/bench_bn_cap.py RUN_DIR RECIPE.yaml [--key value ...] [--caps 512 1024] [--draws 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_loop import recipe_module, synchronize  # noqa: E402
from swa_accel.batchnorm import bn_order, recompute_bn, shard_loader  # noqa: E402
from swa_accel.runner.evaluation import compute_metrics, load_metrics, predict  # noqa: E402
from swa_accel.runner.task import keep_on_device, seeded_dataset  # noqa: E402
from recipes.vision.image_tensors import ImageTensorDataset  # noqa: E402
from swa_accel.seeding import BN_STREAM  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("config")
    parser.add_argument("--caps", type=int, nargs="+", default=[8192])
    parser.add_argument("--draws", type=int, default=3)
    args, overrides = parser.parse_known_args()

    task, training, _, accelerator, _ = recipe_module(args.config).setup(
        ["--config", args.config, *overrides, "--output_dir", str(Path(args.run_dir) / "bn_cap_bench")])
    device = accelerator.device
    for dataset in (task.train_dataset, *task.eval_datasets.values()):
        if isinstance(dataset, ImageTensorDataset):
            dataset.place(device, keep_on_device(dataset.nbytes, device, "auto"))
    module = task.build_model()
    module.load_state_dict(load_file(Path(args.run_dir) / "final" / "swa" / "model.safetensors"))
    module.to(device)
    bn_view = seeded_dataset(task, training.seed, BN_STREAM)
    split, eval_set = next(iter(task.eval_datasets.items()))
    eval_loader = DataLoader(eval_set, batch_size=training.per_device_eval_batch_size, collate_fn=task.collate_fn)
    metrics = load_metrics(["accuracy", "nll"])
    batch = training.per_device_train_batch_size

    def score(cap, draw) -> dict:
        # Each draw is another pass of the loop: its own augmentation epoch and sample order.
        bn_view.set_epoch(draw)
        order = bn_order(len(bn_view), training.seed, draw)
        synchronize(device)
        start = time.perf_counter()
        batches = recompute_bn(module, lambda: shard_loader(bn_view, batch, task.collate_fn, 1, 0, order=order,
                                                             max_samples=cap), device, 1, accelerator.autocast)
        synchronize(device)
        seconds = time.perf_counter() - start
        logits, labels = predict(module, eval_loader, accelerator)
        return {**compute_metrics(metrics, logits, labels), "batches": batches, "pass_s": seconds}

    score(None, 0)  # warm-up: the first pass also loads kernels
    fulls = [score(None, draw) for draw in range(args.draws)]
    full = fulls[0]
    rows = []
    for cap in [None, *args.caps]:
        draws = fulls if cap is None else [score(cap, draw + args.draws) for draw in range(args.draws)]
        rows.append({
            "cap": "full" if cap is None else cap, "samples": len(bn_view) if cap is None else min(cap, len(bn_view)),
            "draws": args.draws, "accuracy_mean": statistics.mean(d["accuracy"] for d in draws),
            "accuracy_min": min(d["accuracy"] for d in draws), "accuracy_max": max(d["accuracy"] for d in draws),
            "nll_mean": statistics.mean(d["nll"] for d in draws),
            "accuracy_max_abs_diff_to_first_full": max(abs(d["accuracy"] - full["accuracy"]) for d in draws),
            "pass_s": statistics.median(d["pass_s"] for d in draws),
        })
    result = {"run_dir": args.run_dir, "config": args.config, "overrides": overrides, "split": split,
              "device": str(device), "rows": rows}
    print("BNCAP " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
