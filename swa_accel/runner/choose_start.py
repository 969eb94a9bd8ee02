"""Suggests where to start SWA from a finished run without it: the epoch where validation loss turns up.

This is the two-run method (a run without SWA, then a second run with SWA from the suggested epoch). The
one-run alternative is `swa_start_candidates`, chosen on the same validation split at the end of one run.
Either way the choice reads the validation split, never the test split.

Usage: python -m swa_accel.choose_start OUTPUT_DIR/metrics.jsonl [--split validation] [--metric nll]
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .outputs import read_metrics


def suggest_start(records: list[dict], split: str = "validation", metric: str = "nll") -> tuple[int, str]:
    """Returns (epoch, explanation): the epoch after which the base model's validation loss is lowest.

    Args:
        records: metrics.jsonl records.
        split: the validation split to read; the test split is refused (choosing on it leaks it).
        metric: a lower-is-better metric.

    Raises:
        ValueError: the test split, or no base-model records with that split and metric.
    """
    if split == "test":
        raise ValueError("split: choosing the SWA start on the test split leaks it into the result; run with a "
                         "validation split (vision: --validation_fraction 0.15) and read that")
    base = [r for r in records if r["model"] == "base" and metric in r and not r.get("final")]
    curve = sorted((r["epoch"], r[metric]) for r in base if r["split"] == split)
    if not curve:
        logged = sorted({r["split"] for r in base})
        raise ValueError(f"split: no base-model '{metric}' records for split '{split}' (logged: {', '.join(logged)}); "
                         "train with a validation split")
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
    parser.add_argument("--split", default="validation", help="validation split to read (never the test split)")
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
