"""Where the average is updated: equal-weight SWA and EMA of a prepared model, kept in fp32.

The averaged copy is a flat `{name: fp32 tensor}` dict, not a deep copy of the module, so it works
for any wrapper (DDP, torch.compile) and never holds a second module graph. Where the copy lives is
a placement's choice: `placement.MainProcessPlacement` (the main process only) or `sharded.ShardedPlacement`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, ContextManager, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # (placement.py imports this module)
    from .placement import Placement
    from .snapshots import SnapshotStore

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """Strips DDP (`module.`) and torch.compile (`_orig_mod.`) segments from a parameter name."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
        for prefix in WRAPPER_PREFIXES:
            name = name.replace("." + prefix, ".")
    return name


def named_tensors(model: nn.Module, buffers: bool, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Parameters (and optionally floating-point buffers) of `model` by wrapper-free name; with `trainable_only`,
    only the parameters that require grad (and no buffer)."""
    tensors = {clean_name(n): p for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    if buffers and not trainable_only:
        tensors.update({clean_name(n): b for n, b in model.named_buffers() if b.is_floating_point()})
    return tensors


class WeightAverager:
    """Equal-weight (SWA) or exponential (EMA) average of a model's weights, in fp32.

    Call `update(model)` right after a real optimizer step. The update is a handful of
    `torch._foreach_*` kernels with no host-device synchronisation: `n_averaged` is a Python int.
    Weights with a NaN or an infinity are never folded in: the check and the choice happen on the
    device (the average keeps its value), and `nonfinite_seen` records it for the loop, which reads
    it where it reads the loss anyway and stops the run.

    Candidates (one run, many averages): `start_candidate(name)` stores the running mean once, at a later
    start c; the equal-weight average from c to now is then exact arithmetic on two stored means,
    (n * mean_n - n_c * mean_c) / (n - n_c), so each candidate costs one copy and no work per update.
    `ema_decays` adds side EMAs of the same updates, one fp32 copy each (one more lerp per update).

    Args:
        model: the prepared (possibly wrapped) model; its wrapper-free names key the average.
        method: "swa" or "ema".
        placement: where the copy lives: `MainProcessPlacement` or `sharded.ShardedPlacement`.
        process_index: this process's rank.
        ema_decay: EMA decay per update.
        ema_warmup: use min(decay, (1 + n) / (10 + n)) so early updates move the average.
        ema_buffers: for EMA, "average" floating buffers too, or "copy" them from the model.
        ema_decays: decays of side EMAs tracked next to an SWA average, as candidates (per update).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str,
        placement: Placement,
        process_index: int = 0,
        ema_decay: float = 0.999,
        ema_warmup: bool = False,
        ema_buffers: str = "average",
        ema_decays: tuple[float, ...] = (),
        ema_warmup_power: Optional[float] = None,
        ema_warmup_gamma: float = 1.0,
        ema_min_decay: float = 0.0,
        avg_fn: Optional[Callable] = None,
        multi_avg_fn: Optional[Callable] = None,
    ) -> None:
        if method not in ("swa", "ema"):
            raise ValueError(f"swa_method: must be swa or ema, got {method!r}")
        if ema_decays and method != "swa":
            raise ValueError("ema_decays: side EMAs are candidates of an SWA run; set swa_method swa")
        self.method = method
        self.placement = placement
        # XLA needs other forms of the update's masking and lerp (see `_zeroed_unless` and `_lerp`).
        self.on_xla = placement.device.type == "xla"
        if avg_fn is not None and multi_avg_fn is not None:
            raise ValueError("avg_fn: pass avg_fn or multi_avg_fn, not both (as torch's AveragedModel)")
        self.avg_fn, self.multi_avg_fn = avg_fn, multi_avg_fn
        self.ema_decay = ema_decay
        self.ema_warmup = ema_warmup
        self.ema_warmup_power, self.ema_warmup_gamma, self.ema_min_decay = (ema_warmup_power, ema_warmup_gamma,
                                                                            ema_min_decay)
        self.average_buffers = method == "ema" and ema_buffers == "average"
        self.n_averaged = 0
        self.averaged: Optional[dict[str, torch.Tensor]] = None
        if placement.holds_copy(process_index):
            source = placement.local_tensors(model, buffers=self.average_buffers)
            self.averaged = self._zeros_like(source)
        # Side EMAs (candidates) and the stored means of later candidate starts: {name: (n_c, mean_c or None)}.
        self.emas: dict[float, Optional[dict[str, torch.Tensor]]] = {
            decay: self._zeros_like(source) if self.averaged is not None else None for decay in ema_decays}
        self.starts: dict[str, tuple[int, Optional[dict[str, torch.Tensor]]]] = {}
        # The snapshot store (snapshots.py), where the run keeps one; candidates that are windows of it.
        self.store: Optional[SnapshotStore] = None
        self.store_starts: dict[str, Optional[int]] = {}  # candidate -> the store point it starts after
        self.extra_candidates: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}  # the store's families
        # A context around each candidate's build (the SWA object times them as `candidate_builds`).
        self.build_phase: Callable[[], ContextManager] = contextlib.nullcontext
        self.extra_counts: dict[str, Callable[[], int]] = {}  # a family's own update count (a window's folds)
        # Set on the device when an update met non-finite weights (and skipped them); never reset.
        self.nonfinite_seen = torch.zeros((), dtype=torch.bool, device=placement.device)
        self._bound_model: Optional[nn.Module] = None
        self._sources: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def _zeros_like(self, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: torch.zeros(t.shape, dtype=torch.float32, device=self.placement.device)
                for name, t in source.items()}

    def _bind(self, model: nn.Module) -> None:
        """Pairs the model's tensors with the averaged ones by name, once per model object."""
        source = self.placement.local_tensors(model, buffers=self.average_buffers)
        missing = sorted(set(self.averaged) - set(source))
        extra = sorted(set(source) - set(self.averaged))
        if missing or extra:
            # A name mismatch would silently leave part of the average frozen; refuse instead.
            raise ValueError(f"averaged model and model differ: missing {missing[:3]}, unexpected {extra[:3]}")
        names = list(self.averaged)
        self._targets = [self.averaged[n] for n in names]
        self._ema_targets = {decay: [ema[n] for n in names] for decay, ema in self.emas.items()}
        self._sources = [source[n] for n in names]
        self._bound_model = model

    def _decay(self) -> float:
        n = self.n_averaged
        if self.ema_warmup_power is not None:  # timm's ModelEmaV3 warmup, at update n
            decay = 1.0 - (1.0 + n / self.ema_warmup_gamma) ** -self.ema_warmup_power
            return max(min(decay, self.ema_decay), self.ema_min_decay)
        if self.ema_warmup:
            return min(self.ema_decay, (1 + n) / (10 + n))
        return self.ema_decay

    def _fp32_sources(self) -> list[torch.Tensor]:
        return [s.detach() if (s.dtype == torch.float32 and s.device == t.device)
                else s.detach().to(device=t.device, dtype=torch.float32, non_blocking=True)
                for s, t in zip(self._sources, self._targets)]

    @torch.no_grad()
    def update(self, model: nn.Module, average: bool = True, store_step: Optional[int] = None) -> None:
        """Folds the model's current weights into the average (call only after a real optimizer step).

        Args:
            average: move the average (False: only the store folds, before the SWA start).
            store_step: the optimizer step, where the store folds this update too (None: it does not).
        """
        fold = store_step is not None and self.store is not None
        if self.averaged is not None and (average or fold):
            if model is not self._bound_model:
                self._bind(model)
            sources = self._fp32_sources()
            # A diverged step must not poison the average for good, and the check must not wait for the
            # device. NaN * 0 is NaN, so the sources are zeroed through their integer bits (finite: x,
            # else 0.0) and the step weight is multiplied by the flag: a non-finite update moves nothing.
            # (The 2-norm is several times cheaper than the max-norm on CPUs; it also flags weights beyond
            # about 1e19, where the sum of squares overflows: diverged all the same.)
            finite = torch.stack(torch._foreach_norm(sources)).sum().isfinite()
            self.nonfinite_seen |= ~finite
            sources = self._zeroed_unless(finite, sources)
            moves = finite.to(torch.float32)
            if fold:
                self.store.fold(sources, moves, store_step)
            if average:
                self._move_average(sources, moves)
        if average:
            self.n_averaged += 1

    def _move_average(self, sources: list[torch.Tensor], moves: torch.Tensor) -> None:
        if self.n_averaged > 0 and (self.avg_fn is not None or self.multi_avg_fn is not None):
            self._custom_update(sources, moves)
        else:
            if self.n_averaged == 0:
                weight = 1.0
            elif self.method == "swa":
                weight = 1.0 / (self.n_averaged + 1)
            else:
                weight = 1.0 - self._decay()
            self._lerp(self._targets, sources, moves * self._weight(weight))
        for decay, targets in self._ema_targets.items():
            self._lerp(targets, sources, moves * self._weight(1.0 if self.n_averaged == 0 else 1.0 - decay))

    def _custom_update(self, sources: list[torch.Tensor], moves: torch.Tensor) -> None:
        """A user's averaging function, in torch's `AveragedModel` forms: `avg_fn(averaged, current, n)` returns the
        new average of one tensor, `multi_avg_fn(averaged_list, current_list, n)` updates a list in place. The
        result replaces the average only where the update was finite (a lerp by the finite flag)."""
        n = torch.tensor(self.n_averaged, device=self.placement.device)
        if self.multi_avg_fn is not None:
            updated = [t.clone() for t in self._targets]
            self.multi_avg_fn(updated, sources, n)
        else:
            updated = [self.avg_fn(t, s, n) for t, s in zip(self._targets, sources)]
        self._lerp(self._targets, updated, moves)

    @torch.no_grad()
    def reset_to(self, model: nn.Module, name: Optional[str] = None) -> None:
        """Restarts the average (and the side EMAs) from the model's current weights, as timm's `ModelEmaV3.set`:
        it holds one update from here. Candidates that began before are dropped (they were differences from the
        old average); `name`, if given, is the restarted average's own candidate. The store is the run's record and
        goes on."""
        if self.averaged is not None:
            if model is not self._bound_model:
                self._bind(model)
            sources = self._fp32_sources()
            for targets in (self._targets, *self._ema_targets.values()):
                torch._foreach_copy_(targets, sources)
        self.n_averaged = 1
        self.starts.clear()
        self.store_starts.clear()
        if name is not None:
            self.starts[name] = (0, None)  # (every update of the restarted average: the average itself)

    # ----- the snapshot store --------------------------------------------------------------

    def attach_store(self, store: SnapshotStore) -> None:
        """Folds go to `store` from now on (on the ranks that hold a copy; it was built like `averaged`)."""
        self.store = store

    def cut_store(self, model: nn.Module, step: int) -> None:
        """A store point after optimizer step `step`, with the model's current weights."""
        if self.store is None or self.averaged is None:
            return
        if model is not self._bound_model:
            self._bind(model)
        self.store.cut(step, dict(zip(self.averaged, self._sources)))

    def store_reader(self):
        """The store's reader for this rank's files, after every queued write (None without a store)."""
        from .store_reader import StoreReader

        if self.store is None:
            return None
        self.store.wait()
        return StoreReader(self.store.folder, self.store.rank, self.store.layout, self.store.points)

    def _weight(self, value: float):
        """An update weight as the graph should see it: a plain number, or on XLA a tensor of its own.

        XLA folds 0 and 1 into the graph as constants and shares one input among equal numbers, so a Python float
        that changes at every update (1/n) would now and then give a graph never seen before: a new compile.
        """
        if self.on_xla:
            return torch.tensor(value, dtype=torch.float32, device=self.placement.device)
        return value

    def _zeroed_unless(self, finite: torch.Tensor, sources: list[torch.Tensor]) -> list[torch.Tensor]:
        """The sources where `finite` holds, else zeros, decided on the device."""
        if self.on_xla:
            # XLA copies an integer view of a float tensor to the host; a select stays on the device.
            return [torch.where(finite, s, 0.0) for s in sources]
        masked = torch._foreach_mul([s.view(torch.int32) for s in sources], finite.to(torch.int32))
        return [m.view(torch.float32) for m in masked]

    def _lerp(self, targets: list[torch.Tensor], sources: list[torch.Tensor], weight: torch.Tensor) -> None:
        if self.on_xla:
            # XLA decomposes a foreach lerp with a tensor weight through a host read (pytorch/xla#7923).
            for target, source in zip(targets, sources):
                target.lerp_(source, weight)
            return
        torch._foreach_lerp_(targets, sources, weight)

    # ----- candidates ----------------------------------------------------------------------

    def start_candidate(self, name: str, store_point: Optional[int] = None) -> None:
        """Marks a later start: the candidate `name` averages the updates from now on. One copy, taken once, unless
        the store has a point here (`store_point`, its index): then the candidate is a window of the store."""
        if name in self.starts:
            raise ValueError(f"candidate {name!r} was started already")
        snapshot = None
        if store_point is not None:
            self.store_starts[name] = store_point
        elif self.averaged is not None and self.n_averaged > 0:
            snapshot = {k: v.clone() for k, v in self.averaged.items()}
        self.starts[name] = (self.n_averaged, snapshot)

    @staticmethod
    def ema_name(decay: float) -> str:
        return f"ema_{decay:g}"

    def candidate_names(self) -> list[str]:
        """Every candidate: the SWA starts in the order they began, the side EMAs, then the store's families."""
        return list(self.starts) + [self.ema_name(d) for d in self.emas] + list(self.extra_candidates)

    def candidate_updates(self, name: str) -> int:
        """How many updates the candidate holds (0: it has not begun)."""
        if name in self.starts:
            return self.n_averaged - self.starts[name][0]
        if name in self.extra_counts:
            return self.extra_counts[name]()
        if name in self.extra_candidates:
            return self.store.folds if self.store is not None else self.n_averaged
        return self.n_averaged

    @torch.no_grad()
    def candidate_tensors(self, name: str) -> Optional[dict[str, torch.Tensor]]:
        """The candidate's averaged fp32 tensors on the copy-holding process (None elsewhere)."""
        if self.averaged is None:
            return None
        with self.build_phase():
            return self._build_candidate(name)

    def _build_candidate(self, name: str) -> dict[str, torch.Tensor]:
        for decay, ema in self.emas.items():
            if name == self.ema_name(decay):
                return ema
        if name in self.extra_candidates:
            return self.extra_candidates[name]()
        n_start, snapshot = self.starts[name]
        if self.candidate_updates(name) < 1:
            raise ValueError(f"candidate {name!r} has no update yet")
        if name in self.store_starts:
            return self.store_window(self.store_starts[name])
        if snapshot is None:
            return self.averaged
        # The difference of two sums cancels most of their magnitude, so it is formed in float64 where the
        # device has it: the error is then only the fp32 rounding of the two stored means, amplified by
        # n / (n - n_c) (measured: relative 1e-6 at 30 updates, 3e-6 at 1,000; see tests/test_candidates.py).
        wide = torch.float32 if self.placement.device.type == "mps" else torch.float64
        n, count = self.n_averaged, self.n_averaged - n_start
        return {k: ((v.to(wide) * n - snapshot[k].to(wide) * n_start) / count).float()
                for k, v in self.averaged.items()}

    def store_window(self, after: Optional[int]) -> dict[str, torch.Tensor]:
        """The mean of the store's folds after point `after` (None: all) up to now, the uncut tail included."""
        reader = self.store_reader()
        tail = (self.store.segment, self.store.segment_count) if self.store.segment_count else None
        return reader.window(after, len(reader.points) - 1, device=self.placement.device, tail=tail)

    def tensors_of(self, candidate: Optional[str] = None) -> Optional[dict[str, torch.Tensor]]:
        """The main average's tensors, or a candidate's, on the copy-holding process (None elsewhere)."""
        return self.averaged if candidate is None else self.candidate_tensors(candidate)

    @property
    def bound_model(self) -> Optional[nn.Module]:
        """The model whose tensors the latest update read (None before the first update)."""
        return self._bound_model

    @property
    def bound_sources(self) -> list[torch.Tensor]:
        """That model's tensors, in the order of `averaged`."""
        return self._sources

    def state_dict(self) -> dict:
        def cpu(tensors):
            return None if tensors is None else {k: v.cpu() for k, v in tensors.items()}

        return {
            "method": self.method,
            "n_averaged": self.n_averaged,
            "averaged": cpu(self.averaged),
            "starts": {name: (n, cpu(snapshot)) for name, (n, snapshot) in self.starts.items()},
            "emas": {decay: cpu(ema) for decay, ema in self.emas.items()},
            "store_starts": dict(self.store_starts),
            "store": self.store.state_dict() if self.store is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method:
            raise ValueError(f"swa_method: checkpoint averaged with {state['method']!r}, config says {self.method!r}")
        saved_emas = state.get("emas", {})
        if sorted(saved_emas) != sorted(self.emas):
            raise ValueError(f"ema_decays: checkpoint tracks {sorted(saved_emas)}, config says {sorted(self.emas)}")
        self.n_averaged = int(state["n_averaged"])
        device = self.placement.device
        # (accelerate hands every rank the main process's state: a rank without the copy keeps no snapshot either.)
        self.starts = {name: (int(n), None if snapshot is None or self.averaged is None
                              else {k: v.to(device) for k, v in snapshot.items()})
                       for name, (n, snapshot) in state.get("starts", {}).items()}
        self.store_starts = dict(state.get("store_starts", {}))
        if self.store is not None:
            if state.get("store") is None:
                raise ValueError("snapshot_every: the checkpoint has no snapshot store; resume without one, or start "
                                 "a new run")
            self.store.load_state_dict(state["store"])
        with torch.no_grad():
            for tensors, saved in [(self.averaged, state["averaged"])] + [
                    (self.emas[d], saved_emas[d]) for d in self.emas]:
                if tensors is not None:
                    for name, tensor in tensors.items():
                        tensor.copy_(saved[name])
