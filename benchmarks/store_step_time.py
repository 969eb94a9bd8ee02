"""The snapshot store's cost to training, paired: the default job with its store against the same job with today's
candidates as copies (the 15 later starts in memory, no store), run in turn, A B A B ...

Per run it reads the run's own phase timers (final/timings.json): the training loop's seconds without its
evaluations and their BN recomputes, which both runs do alike. What stays in is what the store changes: the steps,
the averaging updates (the store's folds), the points (the copies handed to the writer), the candidate starts (a
copy each without the store) and the checkpoints (which hold the store's state and wait for its writer). The ratio
is taken pair by pair, so that the machine's drift between pairs cancels; the median is the figure. Each run's
peak resident memory (the process's own ru_maxrss, from wait4) is recorded beside it.

    .venv/bin/python benchmarks/store_step_time.py --pairs 6 --record benchmarks/records/store_step_time.json
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

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "vision" / "configs" / "digits_small_cnn.yaml"
NO_STORE = ["--snapshot_every", "none", "--lawa_ks", "none", "--bema", "false", "--soup", "false"]


def run(output_dir: Path, extra: list[str]) -> dict:
    """One default job; its phase timers, its wall time and its peak resident memory."""
    command = [sys.executable, str(ROOT / "recipes" / "vision" / "train.py"), "--config", str(CONFIG),
               "--output_dir", str(output_dir), "--overwrite_output_dir", "true", "--plot", "false", *extra]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)  # (this child's own rusage, not every child's maximum)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            log.seek(0)
            raise SystemExit(f"run failed ({process.returncode}): {' '.join(command)}\n{log.read().decode()[-3000:]}")
    wall = time.perf_counter() - start
    timings = json.loads((output_dir / "final" / "timings.json").read_text())
    training = timings["total"] - timings.get("evaluation", 0.0) - timings.get("bn_recompute", 0.0)
    return {"wall": wall, "training": training, "peak_rss_mb": usage.ru_maxrss / 1024, "timings": timings}


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
                  f"without (x{pairs[-1]['training_ratio']:.4f}); whole run x{pairs[-1]['wall_ratio']:.4f}; peak RSS "
                  f"{store['peak_rss_mb']:.0f} MB with the store, {copies['peak_rss_mb']:.0f} MB without",
                  flush=True)
    summary = {
        "median_training_ratio": statistics.median(p["training_ratio"] for p in pairs),
        "median_wall_ratio": statistics.median(p["wall_ratio"] for p in pairs),
        "median_store_phases_s": statistics.median(
            p["store"]["timings"].get("averaging_updates", 0.0) + p["store"]["timings"].get("store_points", 0.0)
            for p in pairs),
        "median_peak_rss_mb": {kind: statistics.median(p[kind]["peak_rss_mb"] for p in pairs)
                               for kind in ("store", "copies")},
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
