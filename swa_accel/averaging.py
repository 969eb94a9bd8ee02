"""Where the average is updated: equal-weight SWA and EMA of a prepared model, kept in fp32.

The averaged copy is a flat `{name: fp32 tensor}` dict, not a deep copy of the module, so it works
for any wrapper (DDP, torch.compile) and never holds a second module graph. Where the copy lives is
a placement's choice: `placement.MainProcessPlacement` (the main process only) or `sharded.ShardedPlacement`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # (placement.py imports this module)
    from .placement import Placement

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


def named_tensors(model: nn.Module, buffers: bool) -> dict[str, torch.Tensor]:
    """Parameters (and optionally floating-point buffers) of `model` by wrapper-free name."""
    tensors = {clean_name(n): p for n, p in model.named_parameters()}
    if buffers:
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
    ) -> None:
        if method not in ("swa", "ema"):
            raise ValueError(f"swa_method: must be swa or ema, got {method!r}")
        if ema_decays and method != "swa":
            raise ValueError("ema_decays: side EMAs are candidates of an SWA run; set swa_method swa")
        self.method = method
        self.placement = placement
        # XLA needs other forms of the update's masking and lerp (see `_zeroed_unless` and `_lerp`).
        self.on_xla = placement.device.type == "xla"
        self.ema_decay = ema_decay
        self.ema_warmup = ema_warmup
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
        if self.ema_warmup:
            return min(self.ema_decay, (1 + self.n_averaged) / (10 + self.n_averaged))
        return self.ema_decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Folds the model's current weights into the average (call only after a real optimizer step)."""
        if self.averaged is not None:
            if model is not self._bound_model:
                self._bind(model)
            sources = [
                s.detach() if (s.dtype == torch.float32 and s.device == t.device)
                else s.detach().to(device=t.device, dtype=torch.float32, non_blocking=True)
                for s, t in zip(self._sources, self._targets)
            ]
            # A diverged step must not poison the average for good, and the check must not wait for the
            # device. NaN * 0 is NaN, so the sources are zeroed through their integer bits (finite: x,
            # else 0.0) and the step weight is multiplied by the flag: a non-finite update moves nothing.
            # (The 2-norm is several times cheaper than the max-norm on CPUs; it also flags weights beyond
            # about 1e19, where the sum of squares overflows: diverged all the same.)
            finite = torch.stack(torch._foreach_norm(sources)).sum().isfinite()
            self.nonfinite_seen |= ~finite
            sources = self._zeroed_unless(finite, sources)
            if self.n_averaged == 0:
                weight = 1.0
            elif self.method == "swa":
                weight = 1.0 / (self.n_averaged + 1)
            else:
                weight = 1.0 - self._decay()
            moves = finite.to(torch.float32)
            self._lerp(self._targets, sources, moves * self._weight(weight))
            for decay, targets in self._ema_targets.items():
                self._lerp(targets, sources, moves * self._weight(1.0 if self.n_averaged == 0 else 1.0 - decay))
        self.n_averaged += 1

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

    def start_candidate(self, name: str) -> None:
        """Marks a later start: the candidate `name` averages the updates from now on. One copy, taken once."""
        if name in self.starts:
            raise ValueError(f"candidate {name!r} was started already")
        snapshot = None
        if self.averaged is not None and self.n_averaged > 0:
            snapshot = {k: v.clone() for k, v in self.averaged.items()}
        self.starts[name] = (self.n_averaged, snapshot)

    @staticmethod
    def ema_name(decay: float) -> str:
        return f"ema_{decay:g}"

    def candidate_names(self) -> list[str]:
        """Every candidate: the SWA starts in the order they began, then the side EMAs."""
        return list(self.starts) + [self.ema_name(d) for d in self.emas]

    def candidate_updates(self, name: str) -> int:
        """How many updates the candidate holds (0: it has not begun)."""
        if name in self.starts:
            return self.n_averaged - self.starts[name][0]
        return self.n_averaged

    @torch.no_grad()
    def candidate_tensors(self, name: str) -> Optional[dict[str, torch.Tensor]]:
        """The candidate's averaged fp32 tensors on the copy-holding process (None elsewhere)."""
        if self.averaged is None:
            return None
        for decay, ema in self.emas.items():
            if name == self.ema_name(decay):
                return ema
        n_start, snapshot = self.starts[name]
        if self.candidate_updates(name) < 1:
            raise ValueError(f"candidate {name!r} has no update yet")
        if snapshot is None:
            return self.averaged
        # The difference of two sums cancels most of their magnitude, so it is formed in float64 where the
        # device has it: the error is then only the fp32 rounding of the two stored means, amplified by
        # n / (n - n_c) (measured: relative 1e-6 at 30 updates, 3e-6 at 1,000; see tests/test_candidates.py).
        wide = torch.float32 if self.placement.device.type == "mps" else torch.float64
        n, count = self.n_averaged, self.n_averaged - n_start
        return {k: ((v.to(wide) * n - snapshot[k].to(wide) * n_start) / count).float()
                for k, v in self.averaged.items()}

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
        with torch.no_grad():
            for tensors, saved in [(self.averaged, state["averaged"])] + [
                    (self.emas[d], saved_emas[d]) for d in self.emas]:
                if tensors is not None:
                    for name, tensor in tensors.items():
                        tensor.copy_(saved[name])
