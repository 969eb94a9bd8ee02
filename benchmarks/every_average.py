"""Every average from one run, over seeds: the default job (whose snapshot store gives SWA windows, LAWA, post-hoc
EMA and BEMA, then the greedy soup), one run per seed; per family, the test accuracy and NLL of the family's member
chosen on validation, of the choice across every family, and of today's choice among the SWA starts only.

    .venv/bin/python benchmarks/every_average.py --seeds 0-7 --output_dir /tmp/every_average \
        [--record benchmarks/records/every_average_8_seeds.json]

Each run is `recipes/vision/train.py --config recipes/vision/configs/digits_small_cnn.yaml --seed S` (no
checkpoints, no plot); the test split only reports, as in the runs themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "vision" / "configs" / "digits_small_cnn.yaml"
FAMILIES = ("swa", "lawa", "posthoc_ema", "bema", "soup")


def seeds_of(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def run(seed: int, folder: Path) -> dict:
    if not (folder / "final" / "candidates.json").exists():
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        subprocess.run([sys.executable, str(ROOT / "recipes" / "vision" / "train.py"), "--config", str(CONFIG),
                        "--output_dir", str(folder), "--seed", str(seed), "--checkpointing_steps", "None",
                        "--plot", "false", "--overwrite_output_dir", "true"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    return json.loads((folder / "final" / "candidates.json").read_text())


def pick(candidates: list[dict], metric: str = "nll") -> dict:
    """The candidate with the lowest validation `metric` (ties: the earlier), as the runs choose."""
    return min(candidates, key=lambda c: c["metrics"]["validation"][metric])


def summarise(reports: dict[int, dict]) -> dict:
    rows: dict[str, list[tuple[float, float]]] = {}
    for report in reports.values():
        candidates = report["candidates"]
        chosen = next(c for c in candidates if c["name"] == report["chosen"])
        rows.setdefault("choice across every family", []).append(
            (chosen["metrics"]["test"]["accuracy"], chosen["metrics"]["test"]["nll"]))
        for family in FAMILIES:
            members = [c for c in candidates if c["kind"] == family]
            if members:
                best = pick(members)
                label = "SWA starts (today's choice)" if family == "swa" else f"{family} (best on validation)"
                rows.setdefault(label, []).append((best["metrics"]["test"]["accuracy"], best["metrics"]["test"]["nll"]))
        chosen_kind = chosen["kind"]
        rows.setdefault(f"chosen family: {chosen_kind}", []).append((0.0, 0.0))
    table = {}
    for label, values in rows.items():
        if label.startswith("chosen family"):
            table[label] = {"runs": len(values)}
            continue
        accuracy, nll = [v[0] for v in values], [v[1] for v in values]
        table[label] = {"test_accuracy_mean": statistics.mean(accuracy), "test_accuracy_min": min(accuracy),
                        "test_accuracy_max": max(accuracy), "test_nll_mean": statistics.mean(nll),
                        "test_nll_min": min(nll), "test_nll_max": max(nll), "runs": len(values)}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-7")
    parser.add_argument("--output_dir", default="/tmp/every_average")
    parser.add_argument("--record", default=None, help="write the per-seed reports' summary here (JSON)")
    args = parser.parse_args()
    reports = {seed: run(seed, Path(args.output_dir) / f"seed_{seed}") for seed in seeds_of(args.seeds)}
    table = summarise(reports)
    per_seed = {seed: {"chosen": r["chosen"],
                       "candidates": {c["name"]: {"kind": c["kind"], "validation_nll": c["metrics"]["validation"]["nll"],
                                                  "test_accuracy": c["metrics"]["test"]["accuracy"],
                                                  "test_nll": c["metrics"]["test"]["nll"]}
                                      for c in r["candidates"]}}
                for seed, r in reports.items()}
    for label, row in table.items():
        if "test_accuracy_mean" in row:
            print(f"| {label} | {row['test_accuracy_mean']:.4f} ({row['test_accuracy_min']:.4f} to "
                  f"{row['test_accuracy_max']:.4f}) | {row['test_nll_mean']:.4f} ({row['test_nll_min']:.4f} to "
                  f"{row['test_nll_max']:.4f}) |")
        else:
            print(f"| {label} | {row['runs']} runs | |")
    if args.record:
        Path(args.record).write_text(json.dumps({"command": " ".join(sys.argv), "summary": table,
                                                 "per_seed": per_seed}, indent=1) + "\n")


if __name__ == "__main__":
    main()
