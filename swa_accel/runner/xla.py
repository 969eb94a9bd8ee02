"""What running under torch_xla (TPU, or XLA's CPU device) needs from the loop, in one place.

XLA traces tensor operations lazily and compiles each distinct graph once; `mark_step` cuts the trace and runs
it. Loops that accelerate does not wrap (the BN recompute) cut it themselves, once per batch, so every pass
reuses the same few graphs. XLA's own counters (`torch_xla.debug.metrics`) say how many graphs were compiled
and how often the host waited for the device; `PhaseCounters` gives them to the phases of a run.

Nothing here imports torch_xla unless the run is on XLA, so the module costs nothing elsewhere.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Mapping

from accelerate.utils import DistributedType

from .config import ConfigError
from ..seeding import XLA_STEP_STREAM, sample_seed
from ..xla_sync import mark_step  # noqa: F401  (the loop's cut, re-exported)

#: The variables with which XLA stores every float32 tensor as bf16 while its dtype still reads float32
#: (pytorch/xla#1489); accelerate sets one of them for `mixed_precision: bf16` on a TPU.
BF16_STORAGE_VARIABLES = ("XLA_USE_BF16", "XLA_DOWNCAST_BF16")


def is_xla(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.XLA


def refuse_bf16_storage(averaging: bool, environ: Mapping[str, str] = os.environ) -> None:
    """Stops an averaging run in which XLA would keep the fp32 average as bf16, with the way to train in bf16.

    Raises:
        ConfigError: XLA_USE_BF16 or XLA_DOWNCAST_BF16 is set to 1.
    """
    for variable in BF16_STORAGE_VARIABLES:
        if averaging and environ.get(variable, "0").strip() not in ("", "0"):
            raise ConfigError(
                f"launch: {variable}=1 makes XLA store every float32 tensor as bf16, so the fp32 average would "
                "silently be bf16; unset it (mixed_precision: 'no' in the accelerate config) and train in bf16 "
                "with --model_dtype bfloat16, which keeps the average in fp32")


def expose_loader_dataset(loader) -> None:
    """Gives accelerate's XLA loader wrapper the `dataset` that its own save_state and load_state read.

    accelerate 1.15 wraps every prepared loader in `MpDeviceLoaderWrapper`, which forwards `batch_sampler` and
    the batch sizes but not `dataset`, so checkpointing raised AttributeError on XLA.
    """
    inner = getattr(loader, "_loader", None)
    if inner is not None and not hasattr(loader, "dataset"):
        loader.dataset = inner.dataset


def seed_step(seed: int, epoch: int, batch: int) -> None:
    """Seeds XLA's random numbers (dropout) for one micro-batch from (seed, epoch, batch in epoch).

    XLA's generator state is not what accelerate's checkpoints restore it to (a resumed run drew other dropout
    masks); seeded from the loop's position, every micro-batch draws the same masks however the run was split.
    """
    import torch_xla.core.xla_model as xm

    xm.set_rng_state(sample_seed(seed, XLA_STEP_STREAM, epoch, batch))


class XlaCounters:
    """XLA's compile and device-to-host transfer counts, read as totals so far.

    `compiles`: graphs compiled (each new graph once; a cached one costs nothing). `transfers`: device-to-host
    copies (an `.item()`, `.cpu()` or print waits for the device). `executions`: graphs run.
    """

    @staticmethod
    def read() -> dict[str, int]:
        import torch_xla.debug.metrics as met

        transfers = met.metric_data("TransferFromDeviceTime")  # (samples, total time, recent samples)
        return {"compiles": met.counter_value("UncachedCompile") or 0,
                "transfers": int(transfers[0]) if transfers else 0,
                "executions": met.counter_value("ExecuteComputation") or 0}

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        return {key: after[key] - before[key] for key in after}


class PhaseCounters:
    """XLA's counters per phase of a run: totals by the innermost open phase, and each occurrence whole.

    Entering and leaving a phase cuts the trace (`mark_step`), so a phase never shares a graph with the training
    step before or after it: each phase compiles its own few graphs once, instead of one more for every mix of
    a step with whatever phase happened to follow it.

    What happens outside any named phase is training: the steps, the averaging updates they trace, and the
    compiles and executions that the loader's `mark_step` triggers. `occurrences[name]` lists what each
    outermost use of a phase cost, nested phases included, with equal neighbours merged (`"times": n`), so a
    phase entered at every step stays one line once it settles. `mark(series, key)` closes an interval: its
    training counts, and under "all_phases" everything the interval did. One per logging step shows that no
    step between two reads waited for the device; one per epoch, that nothing compiled after the warm-up.
    """

    TRAINING = "training"

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, int]] = {}
        self.occurrences: dict[str, list[dict]] = {}
        self.series: dict[str, list[dict]] = {}
        self._open = [self.TRAINING]
        self._last = XlaCounters.read()
        self._since_mark: dict[str, dict[str, int]] = {}  # training counts of each series' open interval
        self._since_mark_all: dict[str, dict[str, int]] = {}  # and every phase's

    @staticmethod
    def _add(totals: dict[str, dict[str, int]], name: str, counts: dict[str, int]) -> None:
        into = totals.setdefault(name, dict.fromkeys(counts, 0))
        for key, value in counts.items():
            into[key] += value

    def _settle(self) -> None:
        now = XlaCounters.read()
        counts = XlaCounters.delta(self._last, now)
        self._last = now
        self._add(self.phases, self._open[-1], counts)
        for series in self._since_mark:
            if self._open[-1] == self.TRAINING:
                self._add(self._since_mark, series, counts)
            self._add(self._since_mark_all, series, counts)

    def _record(self, name: str, counts: dict[str, int]) -> None:
        entries = self.occurrences.setdefault(name, [])
        if entries and {k: v for k, v in entries[-1].items() if k != "times"} == counts:
            entries[-1]["times"] += 1
        else:
            entries.append({**counts, "times": 1})

    @contextmanager
    def phase(self, name: str):
        mark_step()
        self._settle()
        outermost = name not in self._open
        start = self._last
        self._open.append(name)
        try:
            yield
            mark_step()
        finally:
            self._settle()
            self._open.pop()
            if outermost:
                self._record(name, XlaCounters.delta(start, self._last))

    def mark(self, series: str, **key) -> None:
        """Closes the current interval of training counts in `series` (the first call opens it)."""
        self._settle()
        if series in self._since_mark:
            self.series.setdefault(series, []).append(
                {**key, **self._since_mark[series], "all_phases": self._since_mark_all[series]})
        self._since_mark[series] = dict.fromkeys(self._last, 0)
        self._since_mark_all[series] = dict.fromkeys(self._last, 0)

    def report(self) -> dict:
        return {"phases": self.phases, "occurrences": self.occurrences, **self.series}


@contextmanager
def on_host(module, device):
    """Holds `module` in host memory for the block (safetensors reads host memory), then moves it back.

    Parameters keep their identity (`Module.to` swaps their data), so an optimizer holding them is unaffected,
    and the weights come back with the same shapes, so no graph is compiled anew.
    """
    module.to("cpu")
    try:
        yield module
    finally:
        module.to(device)
