"""The snapshot store in a run: built beside the average, and the candidate families it gives.

`attach_store` plans the store (`store_plan.py`), builds it on the ranks that hold a copy, and registers its
families with the averager as candidates, on every rank under the same names:

- the later SWA starts of `swa_start_candidates` become windows of the store where they fall on its points
  (no copy each in memory; elsewhere they keep their copy);
- `lawa_last_<k>`: LAWA, the mean of the weights at the last k points;
- `posthoc_ema_<width>`: the power-function EMA of that sigma_rel, reconstructed (EDM2);
- `bema`: BEMA;
- `window_epochs_<a>_<b>`: the equal-weight mean of the folds after epoch a through epoch b (`store_windows`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from .arguments import SWAArguments
from .averaging import WeightAverager
from .errors import ConfigError
from .power_ema import gamma_of_sigma_rel, weights_at_points
from .snapshots import BEMASettings, SnapshotStore
from .store_plan import StorePlan, plan_store
from .timeline import TrainingPlan


def family_names(args: SWAArguments) -> dict[str, tuple[str, dict]]:
    """Every store family's candidate name -> (kind, its settings), in report order."""
    families: dict[str, tuple[str, dict]] = {}
    if not args.store_enabled:
        return families
    for k in args.lawa_ks or ():
        families[f"lawa_last_{k}"] = ("lawa", {"k": k})
    if args.posthoc_ema_tracked:
        for width in args.posthoc_ema_widths or ():
            families[f"posthoc_ema_{width:g}"] = ("posthoc_ema", {"sigma_rel": width})
    if args.bema:
        families["bema"] = ("bema", {})
    for first, last in args.store_windows or ():
        families[window_name(first, last)] = ("window", {"after_epoch": first, "through_epoch": last})
    return families


def window_name(first: int, last: int) -> str:
    return f"window_epochs_{first}_{last}"


def window_steps(plan: TrainingPlan, store_plan: StorePlan, first: int, last: int) -> tuple[Optional[int], int]:
    """A window's ends in optimizer steps: (the point it starts after, None from the store's start; its last point).

    Raises:
        ConfigError: an end that is not a store point, or past the end of training.
    """
    spe = plan.steps_per_epoch
    after, through = first * spe, last * spe
    points = set(store_plan.cut_steps) | set(store_plan.dropped_steps)
    epochs = _after_epochs(sorted(points), spe)
    name = window_name(first, last)
    if through > plan.total_steps or through not in points:
        raise ConfigError(f"store_windows: {name} ends after epoch {last}, which is not a store point (points "
                          f"{epochs}); choose ends on points or change snapshot_every")
    if after <= store_plan.first_fold_after:
        return None, through
    if after not in points:
        raise ConfigError(f"store_windows: {name} starts after epoch {first}, which is not a store point (points "
                          f"{epochs}); choose ends on points or change snapshot_every")
    return after, through


def window_dropped(plan: TrainingPlan, store_plan: StorePlan, first: int, last: int) -> bool:
    """Whether a disk budget thinned away a point that the window after epoch `first` through `last` ends on."""
    return any(step in store_plan.dropped_steps for step in window_steps(plan, store_plan, first, last)
               if step is not None)


def attach_store(averager: WeightAverager, model: nn.Module, plan: TrainingPlan, args: SWAArguments,
                 store_dir, process_index: int, checkpoints_kept: Optional[int] = None) -> Optional[StorePlan]:
    """Builds the run's store (where `args` asks for one) and registers its families; the store's plan, or None.
    `checkpoints_kept`: see `SnapshotStore`.

    Raises:
        ConfigError: no `store_dir`, or a disk budget that holds not even the last point.
    """
    if not args.store_enabled:
        return None
    if store_dir is None:
        raise ConfigError("snapshot_every: the store writes its files into a folder; pass store_dir (the recipes "
                          "use output_dir/snapshots)")
    local = averager.placement.local_tensors(model, buffers=averager.average_buffers)
    try:
        store_plan = plan_store(plan, args, sum(t.numel() for t in local.values()))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if averager.averaged is not None:
        store = SnapshotStore(Path(store_dir), averager.averaged, averager.placement.device, process_index,
                              sigma_rels=args.posthoc_ema_tracked or (),
                              bema=BEMASettings() if args.bema else None, keep_weights=max(args.lawa_ks or [0]),
                              checkpoints_kept=checkpoints_kept)
        averager.attach_store(store)
    device = averager.placement.device
    for name, (kind, settings) in family_names(args).items():
        if kind == "lawa":
            _check_lawa(plan, store_plan, settings["k"])
            averager.extra_counts[name] = _lawa_count(averager, settings["k"])
        if kind == "window":
            if window_dropped(plan, store_plan, settings["after_epoch"], settings["through_epoch"]):
                continue  # (a disk budget thinned its point away: `dropped_candidates` names it)
            steps = window_steps(plan, store_plan, settings["after_epoch"], settings["through_epoch"])
            settings = {**settings, "after_step": steps[0], "through_step": steps[1]}
            averager.extra_counts[name] = _window_count(averager, settings)
        averager.extra_candidates[name] = _builder(averager, kind, settings, device)
    return store_plan


def _builder(averager: WeightAverager, kind: str, settings: dict, device):
    def build():
        reader = averager.store_reader()
        if kind == "lawa":
            return reader.lawa(settings["k"], device=device)
        if kind == "posthoc_ema":
            return reader.posthoc_ema(settings["sigma_rel"], device=device)
        if kind == "window":
            after, through = _window_points(reader, settings)
            return reader.window(after, through, device=device)
        return reader.bema(device=device)

    return build


def _window_points(reader, settings: dict) -> tuple[Optional[int], int]:
    """A window's point indices in the store (which names its points by step)."""
    after = settings["after_step"]
    last = reader.point_at_step(settings["through_step"])
    if last is None or (after is not None and reader.point_at_step(after) is None):
        raise ValueError(f"snapshot store: no point at step {settings['through_step']} or {after}; the run ended "
                         "before the window did")
    return (None if after is None else reader.point_at_step(after).index), last.index


def _after_epochs(steps, steps_per_epoch: int) -> str:
    """"after epoch 2" or "after epochs 2, 4", the points at `steps` as a refusal names them."""
    epochs = [f"{step / steps_per_epoch:g}" for step in steps]
    return f"after epoch{'s' if len(epochs) != 1 else ''} {', '.join(epochs)}"


def _check_lawa(plan: TrainingPlan, store_plan: StorePlan, k: int) -> None:
    """Refuses, before training, a LAWA over more points than the run will have."""
    points = len(store_plan.cut_steps)
    if k > points:
        epochs = _after_epochs(store_plan.cut_steps, plan.steps_per_epoch)
        raise ConfigError(f"lawa_ks: LAWA over the last {k} points, but the store has {points} in this run "
                          f"({epochs}); choose k up to {points} or a shorter snapshot_every")


def _lawa_count(averager: WeightAverager, k: int):
    def count() -> int:  # the points it averages (0 until there are k)
        store = averager.store
        if store is None:  # (a rank without the copy: nonzero as for the other families, so every rank scores it)
            return averager.n_averaged
        return k if len(store.kept_weights()) >= k else 0

    return count


def lawa_start_step(store, k: int) -> Optional[int]:
    """Where a LAWA over the last `k` points starts, as an SWA start does: the point before its first (with points
    at epoch ends, LAWA over k points is the SWA window of the last k epochs). None: from the store's start, or
    without the store's copy."""
    if store is None:
        return None
    kept = [p for p in store.points if p.weights][-k:]
    return store.points[kept[0].index - 1].step if kept and kept[0].index > 0 else None


def _window_count(averager: WeightAverager, settings: dict):
    def count() -> int:
        store = averager.store
        if store is None:  # (a rank without the copy: nonzero as for the other families, so every rank scores it)
            return averager.n_averaged
        points = {p.step: p for p in store.points}
        last = points.get(settings["through_step"])
        if last is None:
            return 0  # (not reached yet)
        after = settings["after_step"]
        return last.folds - (points[after].folds if after is not None else 0)

    return count


def dropped_candidates(plan: TrainingPlan, store_plan: Optional[StorePlan], args: Optional[SWAArguments] = None
                       ) -> list[str]:
    """The later SWA starts (and `store_windows`) that a disk budget thinned away from the store's points."""
    if store_plan is None:
        return []
    dropped = [name for name, step in plan.candidates[1:] if step in store_plan.dropped_steps]
    for first, last in (args.store_windows or ()) if args is not None else ():
        if window_dropped(plan, store_plan, first, last):
            dropped.append(window_name(first, last))
    return dropped



def posthoc_ema_weight_sums(store_plan: StorePlan, steps_per_epoch: int, args: SWAArguments) -> dict[float, float]:
    """Each asked post-hoc EMA width's least-squares weights summed, at the run's last point, from the plan alone.

    The solve (EDM2's, as ema-pytorch's) does not make them sum to 1: from few points, a width far from the tracked
    ones comes out shrunk toward zero (e.g. 0.96 for 0.2 from 6 points tracking 0.05 and 0.1; 0.996 from 15)."""
    return _weight_sums(_folded_points(store_plan, steps_per_epoch), args)


def posthoc_ema_warnings(store_plan: StorePlan, steps_per_epoch: int, args: SWAArguments) -> list[str]:
    """One line per post-hoc EMA width that the run's points reconstruct more than 1% shrunk or inflated."""
    folds = _folded_points(store_plan, steps_per_epoch)
    tracked = ",".join(f"{s:g}" for s in args.posthoc_ema_tracked or ())
    return [f"warning: posthoc_ema_widths {width:g}: from {len(folds)} points tracking {tracked}, its least-squares "
            f"weights sum to {total:.3f}, so that average is scaled by it, not a true average; keep more points "
            "(a shorter snapshot_every) or track a width near it (posthoc_ema_tracked)"
            for width, total in _weight_sums(folds, args).items() if abs(total - 1.0) > 0.01]


def _folded_points(store_plan: StorePlan, steps_per_epoch: int) -> list[int]:
    """The fold counts of the points that will hold any (the reader skips the others)."""
    return [f for f in store_plan.folds_at_points(steps_per_epoch) if f > 0]


def _weight_sums(folds: list[int], args: SWAArguments) -> dict[float, float]:
    if not args.posthoc_ema_tracked or not args.posthoc_ema_widths or not folds:
        return {}
    gammas = [gamma_of_sigma_rel(s) for s in args.posthoc_ema_tracked]
    return {width: float(weights_at_points(folds, gammas, folds[-1], width).sum()) for width in args.posthoc_ema_widths}
