"""The snapshot store's cost to training, paired: the default job with its store against the same job with today's
candidates as copies (the 15 later starts in memory, no store), run in turn, A B A B ...

Per run it reads the run's own phase timers (final/timings.json): the training loop's seconds without its
evaluations and their BN recomputes, which both runs do alike. What stays in is what the store changes: the steps,
the averaging updates (the store's folds), the points (the copies handed to the writer), the candidate starts (a
copy each without the store) and the checkpoints (which hold the store's state and wait for its writer). The ratio
is taken pair by pair, so that the machine's drift between pairs cancels; the median is the figure.

    .venv/bin/python benchmarks/store_step_time.py --pairs 6 --record benchmarks/records/store_step_time.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "vision" / "configs" / "digits_small_cnn.yaml"
NO_STORE = ["--snapshot_every", "none", "--lawa_ks", "none", "--bema", "false", "--soup", "false"]


def run(output_dir: Path, extra: list[str]) -> dict:
    """One default job; its phase timers and its wall time."""
    command = [sys.executable, str(ROOT / "recipes" / "vision" / "train.py"), "--config", str(CONFIG),
               "--output_dir", str(output_dir), "--overwrite_output_dir", "true", "--plot", "false", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    wall = time.perf_counter() - start
    timings = json.loads((output_dir / "final" / "timings.json").read_text())
    training = timings["total"] - timings.get("evaluation", 0.0) - timings.get("bn_recompute", 0.0)
    return {"wall": wall, "training": training, "timings": timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()
    pairs = []
    with tempfile.TemporaryDirectory() as folder:
        run(Path(folder) / "warmup", NO_STORE)  # (file caches, compiled kernels: not counted)
        for index in range(args.pairs):
            store = run(Path(folder) / "store", [])
            copies = run(Path(folder) / "copies", NO_STORE)
            pairs.append({"store": store, "copies": copies,
                          "training_ratio": store["training"] / copies["training"],
                          "wall_ratio": store["wall"] / copies["wall"]})
            print(f"pair {index + 1}: training {store['training']:.2f} s with the store, {copies['training']:.2f} s "
                  f"without (x{pairs[-1]['training_ratio']:.4f}); whole run x{pairs[-1]['wall_ratio']:.4f}",
                  flush=True)
    summary = {
        "median_training_ratio": statistics.median(p["training_ratio"] for p in pairs),
        "median_wall_ratio": statistics.median(p["wall_ratio"] for p in pairs),
        "median_store_phases_s": statistics.median(
            p["store"]["timings"].get("averaging_updates", 0.0) + p["store"]["timings"].get("store_points", 0.0)
            for p in pairs),
        "median_final_evaluation_s": {kind: statistics.median(p[kind]["timings"]["final_evaluation"] for p in pairs)
                                      for kind in ("store", "copies")},
    }
    print(json.dumps(summary, indent=2))
    if args.record is not None:
        args.record.write_text(json.dumps({
            "command": f"{Path(sys.executable).name} benchmarks/store_step_time.py --pairs {args.pairs}",
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, date {time.strftime('%Y-%m-%d')}",
            "summary": summary, "pairs": pairs}, indent=2))


if __name__ == "__main__":
    main()
