"""Where a run's time goes: seconds per phase (final/timings.json) and, under XLA, compiles and transfers per
phase (final/xla_counters.json)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

from .xla import PhaseCounters


class PhaseClock:
    """Times the loop's phases; after `close_loop`, the phases inside the final evaluation as `after_loop_<phase>`,
    so the loop's own shares stay readable (`final_evaluation` times the whole final evaluation). Under XLA it also
    counts each phase's graphs and copies (`PhaseCounters`)."""

    def __init__(self, xla: bool) -> None:
        self.timings: dict[str, float] = defaultdict(float)
        self.xla_counters = PhaseCounters() if xla else None
        self.loop_closed = False

    @contextmanager
    def timed(self, phase: str):
        key = f"after_loop_{phase}" if self.loop_closed and not phase.startswith("final_") else phase
        start = time.perf_counter()
        with self.counted(phase):
            yield
        self.timings[key] += time.perf_counter() - start

    @contextmanager
    def counted(self, phase: str):
        """Under XLA, a phase with graphs of its own, whose compiles and transfers are counted (elsewhere nothing)."""
        if self.xla_counters is None:
            yield
            return
        with self.xla_counters.phase(phase):
            yield

    def mark(self, series: str, **key) -> None:
        """Under XLA, closes an interval of training counts (per epoch, per logging step); elsewhere nothing."""
        if self.xla_counters is not None:
            self.xla_counters.mark(series, **key)

    def close_loop(self, seconds: float) -> None:
        self.timings["total"] = seconds
        self.loop_closed = True
