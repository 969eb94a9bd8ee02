"""The greedy soup (Wortsman et al. 2022, "Model soups", algorithm 1) over a run's scored candidates.

The candidates are taken in order of their validation score, best first. The soup starts as the best one; each
next candidate joins the uniform mean of the ingredients only if the validation score of that mean is better than
the soup's so far (strictly: a tie keeps the smaller soup). Only the validation split decides.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .candidates import Candidate, higher_is_better

#: tensors_of(candidate name) -> its averaged tensors on this rank (None on a rank without the copy)
TensorsOf = Callable[[str], Optional[dict[str, torch.Tensor]]]
#: score(tensors) -> {split: metrics} of a module holding them (called on every rank; None off the copy's rank)
Score = Callable[[Optional[dict[str, torch.Tensor]]], dict[str, dict[str, float]]]


def better(value: float, than: float, higher: bool) -> bool:
    return value > than if higher else value < than


def greedy_soup(scored: list[Candidate], split: str, metric: str, tensors_of: TensorsOf, score: Score,
                higher: Optional[bool] = None) -> tuple[list[str], dict[str, dict[str, float]],
                                                        Optional[dict[str, torch.Tensor]]]:
    """The soup's ingredients (in the order they joined), its metrics and its tensors (None off the copy's rank).
    `higher`: whether a higher `metric` is better (None: `SELECTION_METRICS` says)."""
    higher = higher_is_better(metric, higher)
    ranked = sorted(scored, key=lambda c: c.metrics[split][metric], reverse=higher)
    first = ranked[0]
    total = _float64(tensors_of(first.name))
    ingredients, metrics = [first.name], first.metrics
    for candidate in ranked[1:]:
        added = tensors_of(candidate.name)
        trial_total = None if total is None else {k: v + added[k].double() for k, v in total.items()}
        trial = _mean(trial_total, len(ingredients) + 1)
        trial_metrics = score(trial)
        if better(trial_metrics[split][metric], metrics[split][metric], higher):
            ingredients.append(candidate.name)
            total, metrics = trial_total, trial_metrics
    return ingredients, metrics, _mean(total, len(ingredients))


def _float64(tensors: Optional[dict[str, torch.Tensor]]) -> Optional[dict[str, torch.Tensor]]:
    return None if tensors is None else {k: v.double() for k, v in tensors.items()}


def _mean(total: Optional[dict[str, torch.Tensor]], count: int) -> Optional[dict[str, torch.Tensor]]:
    return None if total is None else {k: (v / count).float() for k, v in total.items()}
