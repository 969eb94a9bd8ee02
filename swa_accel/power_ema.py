"""EDM2's power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", section 3 and appendix C).

A power-function EMA of exponent gamma, after t updates, weighs update tau (1..t) about in proportion to tau**gamma:
its decay at update t is (1 - 1/t)**(gamma + 1), so the first update is copied. Its width is given as sigma_rel, the
standard deviation of that profile relative to t. Stored snapshots of two or more such EMAs at several t are combined
by least squares into the EMA of any other width at any stored t, with no retraining. Pure arithmetic on floats and
float64 tensors here; the snapshots themselves are the store's (`snapshots.py`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch


def sigma_rel_of_gamma(gamma: float) -> float:
    """The relative width of a power-function profile of exponent `gamma` (EDM2, eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


@lru_cache(maxsize=None)
def _widest_gamma() -> float:
    """The exponent of the widest profile: the width rises from 0 at gamma = -1 to this peak, then falls."""
    low, high = -1.0 + 1e-12, 1.0
    for _ in range(200):  # ternary search on a unimodal function
        a, b = low + (high - low) / 3, high - (high - low) / 3
        if sigma_rel_of_gamma(a) < sigma_rel_of_gamma(b):
            low = a
        else:
            high = b
    return (low + high) / 2


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent whose profile has width `sigma_rel` (EDM2's algorithm 2: the largest real root of its cubic,
    found here by bisection on the branch where the width falls with gamma)."""
    peak = _widest_gamma()
    if not 0.0 < sigma_rel <= sigma_rel_of_gamma(peak):
        raise ValueError(f"sigma_rel: must be in (0, {sigma_rel_of_gamma(peak):.4f}], got {sigma_rel}")
    low, high = peak, 1.0
    while sigma_rel_of_gamma(high) > sigma_rel:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if sigma_rel_of_gamma(middle) > sigma_rel:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def power_decay(t: int, gamma: float) -> float:
    """The decay of a power-function EMA at update t (1-based): 0 at the first update, which is copied."""
    return (1.0 - 1.0 / t) ** (gamma + 1)


def _profile_dot(t_a: torch.Tensor, gamma_a: torch.Tensor, t_b: torch.Tensor, gamma_b: torch.Tensor) -> torch.Tensor:
    """The inner products of the continuous profiles (gamma + 1) tau**gamma / t**(gamma + 1) on [0, t] (EDM2's
    algorithm 3), elementwise over broadcast float64 tensors; written through the ratio of the two t so that large t
    neither overflows nor underflows."""
    shorter = torch.minimum(t_a, t_b)
    longer = torch.maximum(t_a, t_b)
    exponent = torch.where(t_a <= t_b, gamma_b, gamma_a)
    return ((gamma_a + 1) * (gamma_b + 1) * (shorter / longer) ** exponent) / ((gamma_a + gamma_b + 1) * longer)


def reconstruction_weights(snapshot_t: Sequence[float], snapshot_gamma: Sequence[float], target_t: float,
                           target_gamma: float) -> torch.Tensor:
    """The least-squares weights of stored power-EMA snapshots (their update counts and exponents) whose weighted
    sum best matches the profile of exponent `target_gamma` at `target_t` (float64, one weight per snapshot)."""
    if len(snapshot_t) != len(snapshot_gamma) or not snapshot_t:
        raise ValueError("post-hoc EMA: needs one exponent per stored snapshot, and at least one snapshot")
    t_i = torch.tensor(snapshot_t, dtype=torch.float64)
    g_i = torch.tensor(snapshot_gamma, dtype=torch.float64)
    gram = _profile_dot(t_i[:, None], g_i[:, None], t_i[None, :], g_i[None, :])
    target = _profile_dot(t_i, g_i, torch.tensor(float(target_t), dtype=torch.float64),
                          torch.tensor(float(target_gamma), dtype=torch.float64))
    # (Snapshots of nearby widths at the same t are nearly collinear: least squares rather than a plain solve.)
    return torch.linalg.lstsq(gram, target[:, None], driver="gelsd").solution[:, 0]


def weights_at_points(point_folds: Sequence[int], tracked_gammas: Sequence[float], target_folds: int,
                      sigma_rel: float) -> torch.Tensor:
    """`reconstruction_weights` for a store's snapshots: every tracked EMA at each point (point by point, the tracked
    exponents within a point, as the store names them), for width `sigma_rel` at `target_folds` updates."""
    return reconstruction_weights([t for t in point_folds for _ in tracked_gammas],
                                  [g for _ in point_folds for g in tracked_gammas], target_folds,
                                  gamma_of_sigma_rel(sigma_rel))
