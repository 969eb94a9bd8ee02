"""Suggests where to start SWA from a finished run without it: the epoch where validation loss turns up.

Usage: python -m swa_accel.choose_start OUTPUT_DIR/metrics.jsonl [--split test] [--metric nll]
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .outputs import read_metrics


def suggest_start(records: list[dict], split: Optional[str] = None, metric: str = "nll") -> tuple[int, str]:
    """Returns (epoch, explanation): the epoch after which the base model's validation loss is lowest.

    Args:
        records: metrics.jsonl records.
        split: the evaluation split to read; None picks the first one logged.
        metric: a lower-is-better metric.

    Raises:
        ValueError: no base-model records with that split and metric.
    """
    base = [r for r in records if r["model"] == "base" and metric in r and not r.get("final")]
    if split is None and base:
        split = base[0]["split"]
    curve = sorted((r["epoch"], r[metric]) for r in base if r["split"] == split)
    if not curve:
        raise ValueError(f"metric: no base-model '{metric}' records for split '{split}'")
    best_epoch, best_value = min(curve, key=lambda point: point[1])
    last_epoch, last_value = curve[-1]
    if best_epoch == last_epoch:
        return best_epoch, (f"validation {metric} on '{split}' was still falling at the last epoch ({last_epoch}); "
                            "no overfitting seen, so keep the default (last 25% of the budget) or train longer")
    return best_epoch, (f"validation {metric} on '{split}' is lowest after epoch {best_epoch} ({best_value:.4f}) "
                        f"and rises to {last_value:.4f} by epoch {last_epoch}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="metrics.jsonl of a finished run (ideally with --swa_method none)")
    parser.add_argument("--split", default=None, help="evaluation split to read (default: the first logged)")
    parser.add_argument("--metric", default="nll", help="lower-is-better metric to watch (default: nll)")
    args = parser.parse_args(argv)
    try:
        epoch, why = suggest_start(read_metrics(args.metrics), args.split, args.metric)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"suggested SWA start: epoch {epoch}: {why}")
    print(f"override: --swa_start_epoch {epoch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
