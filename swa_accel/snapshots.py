"""The snapshot store: what one run keeps so that every average can be built after it, at bounded memory.

At each fold (an averaging update, or the store's own cadence before the SWA start) the store moves a few tracking
averages in memory: the mean of the folds since the last point (the segment), the power-function EMAs of post-hoc
EMA (`power_ema.py`), and BEMA's EMA. At each point (a cut, e.g. every epoch) it hands CPU copies to a background
writer: the segment's mean with its count, the power EMAs, and the weights themselves (kept for the last
`keep_weights` points: LAWA's windows). Memory is therefore the tracking averages, whatever the number of candidates
built later; `store_reader.py` builds them from the files.

Each rank that holds a copy (the main process, or every rank of a sharded average) writes its own files,
`<kind>-<point>.rank<r>.safetensors`; rank 0 also writes `store.json`, the index, after the files it names. A
checkpoint holds the in-memory part (`state_dict`) and waits for the writer first, so a resumed run goes on from
exactly the files the checkpoint knew: later files of the interrupted run are overwritten as the run reaches them
again, and the index never names a point past the checkpoint's until then.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import ConfigError
from .power_ema import gamma_of_sigma_rel, power_decay
from .snapshot_files import BackgroundWriter

INDEX = "store.json"


@dataclass(frozen=True)
class BEMASettings:
    """BEMA (Block & Zhang 2025), with TRL's `BEMACallback` names and defaults: EMA weight (lag + multiplier *
    step)**-ema_power per fold, floored at min_ema_multiplier; bias correction (lag + multiplier * step)**-bias_power
    times (weights - weights at the first fold)."""

    ema_power: float = 0.5
    bias_power: float = 0.2
    lag: float = 10.0
    multiplier: float = 1.0
    min_ema_multiplier: float = 0.0

    def ema_weight(self, step: int) -> float:
        return max((self.lag + self.multiplier * step) ** (-self.ema_power), self.min_ema_multiplier)

    def correction(self, step: int) -> float:
        return (self.lag + self.multiplier * step) ** (-self.bias_power)


@dataclass
class StorePoint:
    """One cut: after optimizer step `step`, `folds` folds in all, `count` of them in this point's segment."""

    index: int
    step: int
    folds: int
    count: int
    weights: bool  # the point's weights were written (and are kept while it is among the last keep_weights)


@dataclass
class StoreLayout:
    """What the store tracks; the index's header, which a reader needs to build anything."""

    sigma_rels: list[float] = field(default_factory=list)  # widths of the tracked power EMAs
    bema: Optional[dict] = None  # BEMASettings as a dict, or None
    keep_weights: int = 0
    bema_theta0_step: Optional[int] = None
    bema_step: Optional[int] = None  # the step of the BEMA EMA file on disk (the latest point's)

    @property
    def gammas(self) -> list[float]:
        return [gamma_of_sigma_rel(s) for s in self.sigma_rels]


def file_name(kind: str, rank: int, point: Optional[int] = None) -> str:
    return f"{kind}-{point:05d}.rank{rank}.safetensors" if point is not None else f"{kind}.rank{rank}.safetensors"


def refuse_other_tracking(saved: StoreLayout, config: StoreLayout) -> None:
    """Refuses, in one line naming the options, a checkpoint whose store tracked otherwise than this config asks:
    the tracked EMAs and BEMA go on (or are read) as they were, and no LAWA can use weights that were not kept.
    (More kept weights than this config asks for serve it too: the store goes on keeping that many.)

    Raises:
        ConfigError: other tracked widths, BEMA on one side only, or a larger LAWA k than the run kept.
    """
    def widths(layout):
        return ",".join(f"{s:g}" for s in layout.sigma_rels) or "none"

    differences = []  # (the option, what the run kept against what this config asks)
    if saved.sigma_rels != config.sigma_rels:
        differences.append(("posthoc_ema_tracked", f"posthoc_ema_tracked {widths(saved)} (this config: "
                                                   f"{widths(config)})"))
    if saved.bema != config.bema:
        differences.append(("bema", f"bema {_flag(saved.bema)} (this config: {_flag(config.bema)})"))
    if saved.keep_weights < config.keep_weights:
        differences.append(("lawa_ks", f"the weights of its last {saved.keep_weights} points, so lawa_ks up to "
                                       f"{saved.keep_weights} (this config: lawa_ks up to {config.keep_weights})"))
    if differences:
        raise ConfigError(f"{differences[0][0]}: the checkpoint's snapshot store was kept with "
                          + "; ".join(text for _, text in differences) + "; pass the run's store settings")


def _flag(setting) -> str:
    return "false" if setting is None else "true"


class SnapshotStore:
    """The writing side of the store, on a rank that holds (a shard of) the average.

    Args:
        folder: where the files go (created).
        like: the averaged tensors' names and shapes (fp32 tracking copies are made of them).
        device: where the tracking copies live (the average's device).
        rank: this process's rank (file names); rank 0 writes the index.
        sigma_rels: widths of the power-function EMAs to track for post-hoc EMA (two or more, or none).
        bema: BEMA's settings, or None.
        keep_weights: how many of the latest points keep their weights on disk (LAWA's k; BEMA needs 1).
        windows: keep segment means (windows over points); off, a store holds only what the others need.
        checkpoints_kept: how many checkpoints the run keeps (None: all); the weight files any of them names stay.
    """

    def __init__(self, folder: Path, like: dict[str, torch.Tensor], device: torch.device, rank: int, *,
                 sigma_rels: Sequence[float] = (), bema: Optional[BEMASettings] = None, keep_weights: int = 0,
                 windows: bool = True, checkpoints_kept: Optional[int] = None) -> None:
        if len(sigma_rels) == 1:
            raise ValueError("posthoc_ema_tracked: post-hoc EMA needs two or more tracked widths (EDM2 uses 0.05,0.1)")
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"posthoc_ema_tracked: the tracked widths must differ, got {list(sigma_rels)}")
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # (a file in the way, a read-only place: before training, not at the first point)
            raise ConfigError(f"store_dir: cannot make the snapshot store's folder {self.folder} "
                              f"({error.strerror or error})") from None
        self.rank, self.device = rank, device
        self.layout = StoreLayout(sigma_rels=[float(s) for s in sigma_rels],
                                  bema=None if bema is None else asdict(bema),
                                  keep_weights=max(keep_weights, 1 if bema is not None else 0))
        self.bema = bema
        self.windows = windows
        self._gammas = self.layout.gammas
        zeros = lambda: {n: torch.zeros(t.shape, dtype=torch.float32, device=device) for n, t in like.items()}
        self.names = list(like)
        self.segment = zeros() if windows else None
        self.segment_count = 0
        self.power = [zeros() for _ in self._gammas]
        self.bema_ema = zeros() if bema is not None else None
        self.folds = 0
        self.bema_step: Optional[int] = None
        self._theta0_pending: Optional[dict[str, torch.Tensor]] = None  # BEMA's theta_0, until it is handed over
        self.points: list[StorePoint] = []
        # The weight files each kept checkpoint names (oldest first): a resume from any checkpoint still on disk
        # finds its files. `checkpoints_kept`: how many checkpoints the run keeps (None: all).
        self.checkpoints_kept = checkpoints_kept
        self._kept_at_checkpoints: list[set[int]] = []
        # At most two copies wait for the disk (each about the size of one average): the memory stays bounded
        # when points come faster than the disk writes them, and the step waits only then.
        self.writer = BackgroundWriter(max_pending_bytes=2 * 4 * sum(t.numel() for t in like.values()))

    # ----- during training -----------------------------------------------------------------

    @torch.no_grad()
    def fold(self, sources: list[torch.Tensor], moves: torch.Tensor, step: int) -> None:
        """Folds one update: `sources` (fp32, in `names` order, on the store's device), `moves` the device-side
        finite flag as a float (0: the update moves nothing, as in the average), `step` the optimizer step."""
        self.folds += 1
        if self.segment is not None:
            self.segment_count += 1
            self._lerp(list(self.segment.values()), sources, moves * self._weight(1.0 / self.segment_count))
        for gamma, ema in zip(self._gammas, self.power):
            self._lerp(list(ema.values()), sources, moves * self._weight(1.0 - power_decay(self.folds, gamma)))
        if self.bema_ema is not None:
            if self.layout.bema_theta0_step is None:  # the first fold: theta_0 (to disk) and the EMA's start
                self.layout.bema_theta0_step = step
                # (written at the next point or checkpoint: a fold never copies to the host, which on XLA would
                # read the device in the middle of the averaging update)
                self._theta0_pending = {n: s.clone() for n, s in zip(self.names, sources)}
                torch._foreach_copy_(list(self.bema_ema.values()), sources)
            else:
                self._lerp(list(self.bema_ema.values()), sources, moves * self._weight(self.bema.ema_weight(step)))
            self.bema_step = step

    def _weight(self, value: float):
        """A fold's weight as the graph should see it: on XLA a tensor of its own, as the averager's (a Python float
        that changes at every fold would compile a new graph each time)."""
        if self.device.type == "xla":
            return torch.tensor(value, dtype=torch.float32, device=self.device)
        return value

    def _lerp(self, targets: list[torch.Tensor], sources: list[torch.Tensor], weight) -> None:
        if self.device.type == "xla":  # (XLA reads a foreach lerp's tensor weight back to the host: pytorch/xla#7923)
            for target, source in zip(targets, sources):
                target.lerp_(source, weight)
            return
        torch._foreach_lerp_(targets, sources, weight)

    def _hand_over_theta0(self) -> None:
        if self._theta0_pending is not None:
            self.writer.submit(self.folder / file_name("bema-theta0", self.rank), self._theta0_pending)
            self._theta0_pending = None

    def cut(self, step: int, weights: dict[str, torch.Tensor]) -> StorePoint:
        """Ends a point after optimizer step `step`: hands its files to the writer and starts a new segment.
        `weights`: the model's current weights by name (any dtype; copied to fp32 CPU)."""
        self._hand_over_theta0()
        index = len(self.points)
        point = StorePoint(index=index, step=step, folds=self.folds, count=self.segment_count,
                           weights=self.layout.keep_weights > 0)
        if self.segment is not None and self.segment_count > 0:
            self.writer.submit(self.folder / file_name("segment", self.rank, index), self.segment)
        for i, ema in enumerate(self.power):
            if self.folds > 0:
                self.writer.submit(self.folder / file_name(f"power{i}", self.rank, index), ema)
        dropped: list[Path] = []
        if point.weights:
            self.writer.submit(self.folder / file_name("weights", self.rank, index),
                               {n: weights[n] for n in self.names})
            stale = index - self.layout.keep_weights
            if stale >= 0 and self.points[stale].weights:
                self.points[stale].weights = False
                if stale not in self._named_by_checkpoints():  # (else once no kept checkpoint names it)
                    dropped.append(self.folder / file_name("weights", self.rank, stale))
        if self.bema_ema is not None and self.layout.bema_theta0_step is not None:
            if self.bema_step != step:  # a point between folds: BEMA takes this point's weights as its last update,
                # so that its EMA, its correction and the weights it is built from are of the same step
                current = [weights[n].detach().to(device=self.device, dtype=torch.float32) for n in self.names]
                with torch.no_grad():
                    self._lerp(list(self.bema_ema.values()), current, self._weight(self.bema.ema_weight(step)))
                self.bema_step = step
            self.writer.submit(self.folder / file_name("bema-ema", self.rank), self.bema_ema)
            self.layout.bema_step = self.bema_step
        self.points.append(point)
        self.segment_count = 0
        if self.rank == 0:
            self.writer.submit_json(self.folder / INDEX, self.index_record())
        for path in dropped:  # (after the index that no longer names them)
            self.writer.submit_delete(path)
        return point

    def index_record(self) -> dict:
        return {"format": 1, "layout": asdict(self.layout), "points": [asdict(p) for p in self.points]}

    def kept_weights(self) -> set[int]:
        return {p.index for p in self.points if p.weights}

    def _named_by_checkpoints(self) -> set[int]:
        return set().union(*self._kept_at_checkpoints)

    def drop_stale_weights(self) -> None:
        """Removes the weight files that neither the points now nor a kept checkpoint's points keep (a resume
        from any checkpoint still on disk finds its files), once the writer is done."""
        self._hand_over_theta0()
        self.writer.wait()
        keep = self.kept_weights() | self._named_by_checkpoints()
        for point in self.points:
            if point.index not in keep:
                (self.folder / file_name("weights", self.rank, point.index)).unlink(missing_ok=True)

    def wait(self) -> None:
        """Everything handed to the writer is on disk (raises a write's error)."""
        self._hand_over_theta0()
        self.writer.wait()

    # ----- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The in-memory part; waits for the writer first, so the files it names exist."""
        self._hand_over_theta0()
        # This checkpoint's files join the kept ones; those of the checkpoint it pushes out stay until the next drop
        # (the runner deletes an old checkpoint only once the new one exists).
        self._kept_at_checkpoints.append(self.kept_weights())
        self.drop_stale_weights()
        if self.checkpoints_kept is not None:
            self._kept_at_checkpoints = self._kept_at_checkpoints[-self.checkpoints_kept:]
        cpu = lambda tensors: None if tensors is None else {k: v.cpu() for k, v in tensors.items()}
        return {"layout": asdict(self.layout), "points": [asdict(p) for p in self.points], "folds": self.folds,
                "segment_count": self.segment_count, "segment": cpu(self.segment),
                "power": [cpu(ema) for ema in self.power], "bema_ema": cpu(self.bema_ema),
                "bema_step": self.bema_step, "kept_at_checkpoints": [sorted(s) for s in self._kept_at_checkpoints]}

    def load_state_dict(self, state: dict) -> None:
        saved = StoreLayout(**state["layout"])
        refuse_other_tracking(saved, self.layout)
        self.layout = saved
        self.points = [StorePoint(**p) for p in state["points"]]
        self.folds, self.segment_count = int(state["folds"]), int(state["segment_count"])
        self.bema_step = state.get("bema_step")
        self._kept_at_checkpoints = [set(s) for s in state.get("kept_at_checkpoints", [self.kept_weights()])]
        with torch.no_grad():
            pairs = [(self.segment, state["segment"]), (self.bema_ema, state["bema_ema"])]
            pairs += list(zip(self.power, state["power"]))
            for tensors, values in pairs:
                if tensors is not None:
                    for name, tensor in tensors.items():
                        tensor.copy_(values[name])
        if self.rank == 0:  # the index as of the checkpoint: points of the interrupted run past it are not named
            self.writer.submit_json(self.folder / INDEX, self.index_record())
