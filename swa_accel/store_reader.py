"""Averages built from a snapshot store's files (`snapshots.py`): windows, LAWA, post-hoc EMA and BEMA.

Each build reads one file at a time into a float64 sum on the CPU and returns fp32 tensors on the device asked for,
so its memory is one extra float64 copy while it runs, whatever the number of points. A reader works on a finished
run's folder (its `store.json`) as on a live store, one rank's files at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import torch

from .power_ema import weights_at_points
from .snapshot_files import read_tensors
from .snapshots import INDEX, BEMASettings, StoreLayout, StorePoint, file_name


class StoreReader:
    """One rank's view of a store: its points and the averages they give.

    Args:
        folder: the store's folder.
        rank: whose files to read (under a sharded average, each rank's own shards).
        layout, points: the index, when the store is live (else read from `store.json`).
    """

    def __init__(self, folder: Path, rank: int = 0, layout: Optional[StoreLayout] = None,
                 points: Optional[list[StorePoint]] = None) -> None:
        self.folder, self.rank = Path(folder), rank
        if layout is None or points is None:
            index_path = self.folder / INDEX
            if not index_path.is_file():
                raise FileNotFoundError(f"snapshot store: no {INDEX} in {self.folder}; is it a run's snapshot folder?")
            record = json.loads(index_path.read_text())
            layout, points = StoreLayout(**record["layout"]), [StorePoint(**p) for p in record["points"]]
        self.layout, self.points = layout, points

    # ----- what there is -------------------------------------------------------------------

    def point_at_step(self, step: int) -> Optional[StorePoint]:
        return next((p for p in self.points if p.step == step), None)

    def folds_between(self, after: Optional[int], through: int) -> int:
        """The folds in the segments of points after point `after` (None: from the first) through point `through`."""
        return sum(p.count for p in self.points[(-1 if after is None else after) + 1: through + 1])

    def _check_point(self, argument: str, index: int) -> int:
        """`index` if it names one of the points (a negative or larger one would silently slice another window)."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.points):
            raise ValueError(f"snapshot store: {argument}={index!r} is not a point index; this store has "
                             f"{len(self.points)} points, 0 to {len(self.points) - 1} (reader.points lists them)")
        return index

    def weight_points(self) -> list[StorePoint]:
        return [p for p in self.points if p.weights]

    def _path(self, kind: str, point: Optional[int] = None) -> Path:
        return self.folder / file_name(kind, self.rank, point)

    def _weighted_sum(self, parts: Iterable[tuple[object, float]], device) -> dict[str, torch.Tensor]:
        """The sum of weight * tensors over `parts`: (a file, or tensors in memory, and its weight)."""
        total: Optional[dict[str, torch.Tensor]] = None
        for source, weight in parts:
            tensors = read_tensors(source) if isinstance(source, Path) else source
            if total is None:
                total = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in tensors.items()}
            for name, tensor in tensors.items():
                total[name].add_(tensor.to("cpu", torch.float64), alpha=weight)
        if total is None:
            raise ValueError("snapshot store: nothing stored for this average")
        return {n: t.to(device=device, dtype=torch.float32) for n, t in total.items()}

    # ----- the families ---------------------------------------------------------------------

    def window(self, after: Optional[int], through: int, device=None,
               tail: Optional[tuple[dict[str, torch.Tensor], int]] = None) -> dict[str, torch.Tensor]:
        """The equal-weight mean of every fold after point `after` (None: from the store's start) through point
        `through`: its segments' means weighted by their counts. `tail`: a live store's uncut segment (its mean and
        count), folded after the last point."""
        if tail is None:  # (a live store's window may end in its uncut tail, past its last point)
            self._check_point("through", through)
        if tail is None and after is not None and self._check_point("after", after) >= through:
            raise ValueError(f"snapshot store: a window after point {after} through point {through} holds nothing; "
                             "after must come before through")
        chosen = [p for p in self.points[(-1 if after is None else after) + 1: through + 1] if p.count > 0]
        parts = [(self._path("segment", p.index), p.count) for p in chosen]
        if tail is not None:
            parts.append(tail)
        total = sum(count for _, count in parts)
        if total == 0:
            raise ValueError(f"snapshot store: no fold between points {after} and {through}")
        return self._weighted_sum(((source, count / total) for source, count in parts), device)

    def lawa(self, k: int, device=None) -> dict[str, torch.Tensor]:
        """LAWA: the mean of the weights at the last `k` points."""
        kept = self.weight_points()[-k:]
        if len(kept) < k:
            raise ValueError(f"lawa: {k} points asked for, the store keeps the weights of {len(kept)}")
        return self._weighted_sum(((self._path("weights", p.index), 1.0 / k) for p in kept), device)

    def posthoc_ema_weights(self, sigma_rel: float, through: Optional[int] = None) -> list[tuple[Path, float]]:
        """The tracked power-EMA snapshots up to point `through` (default: the last) and their least-squares
        weights for the profile of width `sigma_rel` at that point's fold count."""
        if not self.points:
            raise ValueError("posthoc_ema: the store has no point yet")
        through = len(self.points) - 1 if through is None else self._check_point("through", through)
        gammas = self.layout.gammas  # (a bisection per tracked width: once, not per point)
        if not gammas:
            raise ValueError("posthoc_ema: the store tracks no power EMA (posthoc_ema_tracked)")
        points = [p for p in self.points[:through + 1] if p.folds > 0]
        if not points:
            raise ValueError(f"posthoc_ema: no fold up to point {through} (the first folds come after it)")
        weights = weights_at_points([p.folds for p in points], gammas, self.points[through].folds, sigma_rel)
        files = [self._path(f"power{i}", p.index) for p in points for i in range(len(gammas))]
        return [(path, float(w)) for path, w in zip(files, weights)]

    def posthoc_ema(self, sigma_rel: float, through: Optional[int] = None, device=None) -> dict[str, torch.Tensor]:
        """The power-function EMA of width `sigma_rel` at point `through` (default: the last), reconstructed."""
        return self._weighted_sum(self.posthoc_ema_weights(sigma_rel, through), device)

    def bema(self, device=None) -> dict[str, torch.Tensor]:
        """BEMA at the latest point: EMA + correction(step) * (weights - weights at the first fold)."""
        if self.layout.bema is None or self.layout.bema_step is None:
            raise ValueError("bema: the store tracks no BEMA (bema false), or it has not begun")
        last = self.point_at_step(self.layout.bema_step)
        if last is None or not last.weights:
            raise ValueError(f"bema: the store has no weights at step {self.layout.bema_step}")
        alpha = BEMASettings(**self.layout.bema).correction(self.layout.bema_step)
        return self._weighted_sum([(self._path("bema-ema"), 1.0), (self._path("weights", last.index), alpha),
                                   (self._path("bema-theta0"), -alpha)], device)
