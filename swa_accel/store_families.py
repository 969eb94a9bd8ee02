"""The snapshot store in a run: built beside the average, and the candidate families it gives.

`attach_store` plans the store (`store_plan.py`), builds it on the ranks that hold a copy, and registers its
families with the averager as candidates, on every rank under the same names:

- the later SWA starts of `swa_start_candidates` become windows of the store where they fall on its points
  (no copy each in memory; elsewhere they keep their copy);
- `lawa_last_<k>`: LAWA, the mean of the weights at the last k points;
- `posthoc_ema_<width>`: the power-function EMA of that sigma_rel, reconstructed (EDM2);
- `bema`: BEMA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from .arguments import SWAArguments
from .averaging import WeightAverager
from .errors import ConfigError
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
    return families


def attach_store(averager: WeightAverager, model: nn.Module, plan: TrainingPlan, args: SWAArguments,
                 store_dir, process_index: int) -> Optional[StorePlan]:
    """Builds the run's store (where `args` asks for one) and registers its families; the store's plan, or None.

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
                              bema=BEMASettings() if args.bema else None, keep_weights=max(args.lawa_ks or [0]))
        averager.attach_store(store)
    device = averager.placement.device
    for name, (kind, settings) in family_names(args).items():
        averager.extra_candidates[name] = _builder(averager, kind, settings, device)
    return store_plan


def _builder(averager: WeightAverager, kind: str, settings: dict, device):
    def build():
        reader = averager.store_reader()
        if kind == "lawa":
            return reader.lawa(settings["k"], device=device)
        if kind == "posthoc_ema":
            return reader.posthoc_ema(settings["sigma_rel"], device=device)
        return reader.bema(device=device)

    return build


def dropped_candidates(plan: TrainingPlan, store_plan: Optional[StorePlan]) -> list[str]:
    """The later SWA starts that a disk budget thinned away from the store's points."""
    if store_plan is None:
        return []
    return [name for name, step in plan.candidates[1:] if step in store_plan.dropped_steps]
