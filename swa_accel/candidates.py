"""A run's candidate averages, scored, and the choice among them on the validation split only.

A `Candidate` is one average (an SWA start or a side EMA) with its scores per split. `Choice` holds all of them,
the chosen name and the reason, as written to final/candidates.json. `choose_candidate` is handed validation
metrics and nothing else: the test split cannot reach the choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from .arguments import SELECTION_METRICS
from .errors import ConfigError


@dataclass
class Candidate:
    """One candidate average after scoring.

    Attributes:
        name: e.g. `swa_from_epoch_10` or `ema_0.999`.
        kind: "swa" (an equal-weight average from `start_step`), "ema" (a side EMA of the same updates), or a
            store family: "lawa", "posthoc_ema", "bema"; or "soup".
        start_step, start_epoch: where its averaging began (an EMA: the SWA start).
        decay: the EMA's decay per update; None for SWA.
        n_averaged: the updates it holds.
        metrics: split -> metric -> value.
    """

    name: str
    kind: str
    start_step: int
    start_epoch: float
    decay: Optional[float]
    n_averaged: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # a family's own: LAWA's k, post-hoc EMA's sigma_rel, the soup's


@dataclass
class Choice:
    """Every scored candidate in order (the SWA start first), the chosen one and why."""

    candidates: list[Candidate]
    chosen: str
    reason: str
    selection_split: Optional[str]
    selection_metric: str

    @property
    def best(self) -> Candidate:
        return next(c for c in self.candidates if c.name == self.chosen)

    @property
    def is_a_choice(self) -> bool:
        """More than one candidate was scored (else the single average is all there is to report)."""
        return len(self.candidates) > 1

    def record(self) -> dict:
        """final/candidates.json."""
        return {"chosen": self.chosen, "reason": self.reason, "selection_split": self.selection_split,
                "selection_metric": self.selection_metric, "candidates": [asdict(c) for c in self.candidates]}


def choose(candidates: list[Candidate], split: Optional[str], metric: str, higher: Optional[bool] = None) -> Choice:
    """The choice among scored candidates on `split` (None: no validation split, so only one candidate)."""
    if split is None:
        if len(candidates) != 1:
            raise ValueError("selection: choosing among candidates needs a validation split")
        return Choice(candidates, candidates[0].name, "the only candidate (no validation split)", None, metric)
    best, reason = choose_candidate({c.name: c.metrics[split] for c in candidates}, metric, higher)
    return Choice(candidates, best, reason, split, metric)


def higher_is_better(metric: str, higher: Optional[bool] = None) -> bool:
    """`higher` where given (a metric of the caller's own, such as a Trainer's), else `SELECTION_METRICS`'s."""
    return SELECTION_METRICS[metric] if higher is None else higher


def choose_candidate(validation: dict[str, dict[str, float]], metric: str,
                     higher: Optional[bool] = None) -> tuple[str, str]:
    """The best candidate by `metric` and a one-line reason.

    Args:
        validation: candidate name -> its metrics on the validation split, in candidate order (the SWA
            start first); ties go to the earlier candidate, i.e. the longer average.
        metric: a key of `SELECTION_METRICS`, or any metric with `higher` given.
        higher: whether a higher value of `metric` is better (None: `SELECTION_METRICS` says).

    Raises:
        ValueError: no candidate, or a candidate without the metric.
    """
    if not validation:
        raise ValueError("selection: no candidate to choose from")
    missing = [name for name, values in validation.items() if metric not in values]
    if missing:
        raise ValueError(f"selection_metric: candidate {missing[0]!r} has no validation {metric!r}")
    higher = higher_is_better(metric, higher)
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


def check_selection(count: int, validation_split: Optional[str], metric: str, metric_names: Sequence[str],
                    asked_by: Sequence[str] = ("swa_start_candidates",)) -> None:
    """Refuses, before training, a choice among `count` candidates that could not be made: no validation split to
    choose on, or a selection metric the task does not compute. `asked_by`: the options that made the candidates
    (the line names them)."""
    if count > 1 and validation_split is None:
        options = ", ".join(asked_by)
        raise ConfigError(f"{asked_by[0]}: choosing among candidates ({options}) needs a validation split; vision: "
                          "set validation_fraction (or validation_split), text: an eval_split named validation")
    if count > 1 and metric not in metric_names:
        raise ConfigError(f"selection_metric: this recipe computes {', '.join(metric_names)}, not {metric!r}")
