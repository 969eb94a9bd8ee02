"""Where should SWA start? The one-run choice against the two-run method, over seeds, on the clean test split.

For each seed (which also redraws the label noise and the validation carve) it runs the vision recipe:

1. one run of the config as it is: the SWA start and its later candidates; rows "default start" (the SWA
   start's average) and "one-run choice" (the candidate chosen on the validation split) both come from it;
2. the two-run method: a run without SWA, `choose_start` on its validation NLL, then a second run with
   SWA from that epoch (and no candidates);
3. a cosine-to-zero run of the same budget, without SWA.

Compute is counted from each run's own timings.json (training loop plus the final evaluation, which for the
one-run method includes scoring every candidate), and as process wall time.

Usage:
  python benchmarks/start_selection.py recipes/vision/configs/digits_small_cnn.yaml --seeds 0 1 2 3 4 5 6 7 \
      --out benchmarks/records/start_selection.json [--key value ...]   # extra keys go to every run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swa_accel.runner.choose_start import suggest_start  # noqa: E402
from swa_accel.runner.outputs import read_metrics  # noqa: E402

SCRIPT = ROOT / "recipes" / "vision" / "train.py"


def run(config: str, output_dir: Path, args: list[str]) -> dict:
    """One recipe run in its own process; returns its final results, candidates, timings and wall time."""
    command = [sys.executable, str(SCRIPT), "--config", config, "--output_dir", str(output_dir),
               "--overwrite_output_dir", "true", "--checkpointing_steps", "None", "--plot", "false", *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={"TQDM_DISABLE": "1", **_env()})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    final = output_dir / "final"
    timings = json.loads((final / "timings.json").read_text())
    candidates_path = final / "candidates.json"
    return {
        "results": json.loads((final / "results.json").read_text()),
        "candidates": json.loads(candidates_path.read_text()) if candidates_path.exists() else None,
        "compute_s": timings["total"] + timings.get("final_evaluation", 0.0),
        "timings": timings,
        "wall_s": wall,
        "records": read_metrics(output_dir / "metrics.jsonl"),
    }


def _env() -> dict:
    import os

    return dict(os.environ)


def test_metrics(result: dict, model: str) -> dict:
    return result["results"][model]["test"]


def one_seed(config: str, seed: int, work: Path, extra: list[str], epochs: int) -> dict:
    seeded = ["--seed", str(seed), "--label_noise_seed", str(seed), *extra]
    one = run(config, work / f"one_run_{seed}", seeded)
    candidates = {c["name"]: c for c in one["candidates"]["candidates"]}
    first = next(iter(candidates))
    chosen = one["candidates"]["chosen"]

    first_run = run(config, work / f"two_run_a_{seed}", [*seeded, "--swa_method", "none"])
    epoch, why = suggest_start(first_run["records"], split="validation", metric="nll")
    # choose_start's answer is an epoch after which to start; the last epoch leaves nothing to average.
    start = min(epoch, epochs - 1)
    second_run = run(config, work / f"two_run_b_{seed}", [*seeded, "--swa_start_epoch", str(start),
                                                           "--swa_start_candidates", "none", "--ema_decays", "none"])
    cosine = run(config, work / f"cosine_{seed}", [*seeded, "--swa_method", "none", "--lr_scheduler_type", "cosine"])
    return {
        "seed": seed,
        "default_start": {"name": first, **candidates[first]["metrics"]["test"]},
        "one_run_choice": {"name": chosen, **candidates[chosen]["metrics"]["test"],
                           "validation_nll": candidates[chosen]["metrics"]["validation"]["nll"]},
        "two_run": {"start_epoch": start, "why": why, **test_metrics(second_run, "swa")},
        "cosine": test_metrics(cosine, "base"),
        "compute_s": {"one_run": one["compute_s"], "two_run": first_run["compute_s"] + second_run["compute_s"],
                      "cosine": cosine["compute_s"]},
        "wall_s": {"one_run": one["wall_s"], "two_run": first_run["wall_s"] + second_run["wall_s"],
                   "cosine": cosine["wall_s"]},
        "one_run_timings": one["timings"],
    }


def summarize(rows: list[dict]) -> dict:
    wins = sum(r["one_run_choice"]["accuracy"] >= r["two_run"]["accuracy"] for r in rows)
    swa_beats_cosine = sum(max(r["default_start"]["accuracy"], r["one_run_choice"]["accuracy"])
                           > r["cosine"]["accuracy"] for r in rows)
    chosen_beats_cosine = sum(r["one_run_choice"]["accuracy"] > r["cosine"]["accuracy"] for r in rows)
    ratio = sum(r["compute_s"]["one_run"] for r in rows) / sum(r["compute_s"]["two_run"] for r in rows)
    wall_ratio = sum(r["wall_s"]["one_run"] for r in rows) / sum(r["wall_s"]["two_run"] for r in rows)

    def mean(key: str, metric: str) -> float:
        return sum(r[key][metric] for r in rows) / len(rows)

    return {
        "seeds": len(rows),
        "one_run_matches_or_beats_two_run": wins,
        "swa_beats_cosine": swa_beats_cosine,
        "one_run_choice_beats_cosine": chosen_beats_cosine,
        "compute_ratio_one_run_over_two_run": ratio,
        "wall_ratio_one_run_over_two_run": wall_ratio,
        "mean_test_accuracy": {k: mean(k, "accuracy") for k in ("default_start", "one_run_choice", "two_run", "cosine")},
        "mean_test_nll": {k: mean(k, "nll") for k in ("default_start", "one_run_choice", "two_run", "cosine")},
    }


def table(rows: list[dict]) -> str:
    lines = ["| seed | default start | one-run choice | two-run (start) | cosine |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['default_start']['accuracy']:.4f} | {r['one_run_choice']['accuracy']:.4f} "
                     f"({r['one_run_choice']['name'].replace('swa_from_epoch_', 'epoch ')}) | "
                     f"{r['two_run']['accuracy']:.4f} (epoch {r['two_run']['start_epoch']}) | "
                     f"{r['cosine']['accuracy']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--epochs", type=int, default=40, help="the config's num_train_epochs")
    parser.add_argument("--work", default="/tmp/start_selection")
    parser.add_argument("--out", required=True)
    args, extra = parser.parse_known_args()
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(args.config, seed, Path(args.work), extra, args.epochs))
        print(json.dumps({k: rows[-1][k] for k in ("seed", "default_start", "one_run_choice", "two_run", "cosine",
                                                   "compute_s", "wall_s")}), flush=True)
    report = {"command": " ".join(sys.argv), "extra_args": extra, "summary": summarize(rows), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(table(rows))
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
