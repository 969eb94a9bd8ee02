"""XLA's counters of finished runs, per phase: graphs compiled, device-to-host copies, uses of the phase.

Reads `final/xla_counters.json`, which every run on an XLA device writes. A compile is a graph XLA had not seen
(it caches by graph), so the compiles add up to the number of distinct graphs the run compiled.

Usage (runs made with the XLA venv, e.g. `PJRT_DEVICE=CPU .venv-xla/bin/python recipes/vision/train.py ...`):
  python benchmarks/xla_counters.py RUN_DIR [RUN_DIR ...]     # one JSON line per run, then a table each
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(run: Path) -> dict:
    report = json.loads((run / "final" / "xla_counters.json").read_text())
    phases = {name: {"compiles": counts["compiles"], "transfers": counts["transfers"],
                     "uses": sum(entry["times"] for entry in report["occurrences"].get(name, []))}
              for name, counts in report["phases"].items()}
    epochs = report["epochs"]
    return {
        "run": str(run),
        "distinct_graphs": sum(counts["compiles"] for counts in report["phases"].values()),
        "phases": phases,
        "compiles_per_epoch": [epoch["all_phases"]["compiles"] for epoch in epochs],
        "training_transfers_between_logging_steps": sum(i["transfers"] for i in report["log_intervals"]),
        "logging_intervals": len(report["log_intervals"]),
    }


def table(result: dict) -> str:
    lines = [f"{result['run']}: {result['distinct_graphs']} distinct graphs compiled",
             f"{'phase':<18}{'uses':>6}{'compiles':>10}{'transfers':>11}"]
    for name, counts in result["phases"].items():
        uses = counts["uses"] or "-"
        lines.append(f"{name:<18}{uses:>6}{counts['compiles']:>10}{counts['transfers']:>11}")
    lines.append(f"compiles per epoch (all phases): {result['compiles_per_epoch']}")
    lines.append(f"device-to-host copies between logging steps: {result['training_transfers_between_logging_steps']}"
                 f" over {result['logging_intervals']} intervals")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    results = [summary(Path(run)) for run in sys.argv[1:]]
    for result in results:
        print(json.dumps(result))
    for result in results:
        print("\n" + table(result))


if __name__ == "__main__":
    main()
