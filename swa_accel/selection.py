"""Choosing one average among the candidates of a run, on the validation split only.

`choose_candidate` is handed validation metrics and nothing else: the test split cannot reach the choice.
"""

from __future__ import annotations

from .config import SELECTION_METRICS


def choose_candidate(validation: dict[str, dict[str, float]], metric: str) -> tuple[str, str]:
    """The best candidate by `metric` and a one-line reason.

    Args:
        validation: candidate name -> its metrics on the validation split, in candidate order (the SWA
            start first); ties go to the earlier candidate, i.e. the longer average.
        metric: a key of `SELECTION_METRICS`.

    Raises:
        ValueError: no candidate, or a candidate without the metric.
    """
    if not validation:
        raise ValueError("selection: no candidate to choose from")
    missing = [name for name, values in validation.items() if metric not in values]
    if missing:
        raise ValueError(f"selection_metric: candidate {missing[0]!r} has no validation {metric!r}")
    higher = SELECTION_METRICS[metric]
    names = list(validation)
    best = max(names, key=lambda n: validation[n][metric]) if higher else min(names, key=lambda n: validation[n][metric])
    first = names[0]
    if len(names) == 1:
        return best, f"the only candidate (validation {metric} {validation[best][metric]:.4f})"
    direction = "highest" if higher else "lowest"
    reason = f"{direction} validation {metric} ({validation[best][metric]:.4f}) of {len(names)} candidates"
    if best != first:
        reason += f"; the SWA start, {first}, has {validation[first][metric]:.4f}"
    return best, reason
