"""Compute of the two start-selection methods when each runs only the evaluations it needs.

The one-run method needs only the final scoring of its candidates (`--eval_every_epochs 1000`); the two-run
method needs its first run's per-epoch validation curve (reused from a `start_selection.py` grid run with the
same config, whose timings it reads) and only the final evaluation of its second run. Training is unchanged by
evaluation, so the accuracies equal those of the grid.

Usage:
  python benchmarks/start_selection_needed_evals.py recipes/vision/configs/digits_small_cnn.yaml \
      --grid_work /tmp/ssq --seeds 0 1 2 --out benchmarks/records/start_selection_compute_needed_evals.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from start_selection import run  # noqa: E402
from swa_accel.runner.choose_start import suggest_start  # noqa: E402
from swa_accel.runner.outputs import read_metrics  # noqa: E402

ONLY_FINAL = ["--eval_every_epochs", "1000"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--grid_work", required=True, help="the --work folder of a start_selection.py run")
    parser.add_argument("--work", default="/tmp/start_selection_needed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        seeded = ["--seed", str(seed), "--label_noise_seed", str(seed)]
        first = Path(args.grid_work) / f"two_run_a_{seed}"
        timings = json.loads((first / "final" / "timings.json").read_text())
        first_compute = timings["total"] + timings.get("final_evaluation", 0.0)
        epoch, _ = suggest_start(read_metrics(first / "metrics.jsonl"))
        one = run(args.config, Path(args.work) / f"one_run_{seed}", [*seeded, *ONLY_FINAL])
        second = run(args.config, Path(args.work) / f"two_run_b_{seed}",
                     [*seeded, *ONLY_FINAL, "--swa_start_epoch", str(min(epoch, args.epochs - 1)),
                      "--swa_start_candidates", "none"])
        chosen = one["candidates"]["chosen"]
        chosen_metrics = next(c for c in one["candidates"]["candidates"] if c["name"] == chosen)["metrics"]
        two_run = first_compute + second["compute_s"]
        rows.append({"seed": seed, "one_run_s": one["compute_s"], "two_run_s": two_run,
                     "ratio": one["compute_s"] / two_run, "one_run_chosen": chosen,
                     "one_run_test_accuracy": chosen_metrics["test"]["accuracy"], "two_run_start": epoch,
                     "two_run_test_accuracy": second["results"]["swa"]["test"]["accuracy"]})
        print(json.dumps(rows[-1]), flush=True)
    ratio = sum(r["one_run_s"] for r in rows) / sum(r["two_run_s"] for r in rows)
    report = {"command": " ".join(sys.argv), "rows": rows, "ratio": ratio}
    Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(json.dumps({"ratio": ratio}))


if __name__ == "__main__":
    main()
