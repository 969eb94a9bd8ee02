"""Stopping cleanly when the cluster asks: SIGTERM (SLURM at the time limit, Kubernetes, spot instances) and one
extra signal (`stop_signal`, SIGUSR1 by default, as SLURM's `--signal=USR1@120` sends).

The handler only notes the signal, so a checkpoint write or an evaluation in progress finishes as if nothing had
happened. The loop reads the note at its logging steps, inside the collective it runs there anyway, so every rank
stops after the same optimizer step without a host sync per step; the run then saves a checkpoint and exits with
`PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

#: The exit status of a run stopped by a signal after saving a checkpoint (128 + SIGTERM, as for a process the
#: signal ended); a job script requeues on it and resumes with `--resume_from_checkpoint auto`.
PREEMPTED_EXIT_CODE = 143


def signal_number(name: str) -> signal.Signals:
    """`SIGUSR1`, `USR1` or `usr1` as a signal; ValueError for a name this platform lacks."""
    key = name.upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        return signal.Signals[key]
    except KeyError:
        raise ValueError(f"no signal named {name!r}") from None


class StopSignals:
    """Notes SIGTERM and `extra` (a signal name, or None) while installed; `received` names the first one."""

    def __init__(self, extra: Optional[str]) -> None:
        self.signals = [signal.SIGTERM] + ([signal_number(extra)] if extra else [])
        self.received: Optional[str] = None
        self.previous: dict[signal.Signals, object] = {}

    def _note(self, number: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name

    def install(self) -> "StopSignals":
        """Installs the handlers; a run outside the main thread (XLA's TPU launcher spawns one) cannot have any:
        there, a stop signal ends the process as before."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for number in self.signals:
            self.previous[number] = signal.signal(number, self._note)
        return self

    def uninstall(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    @property
    def pending(self) -> float:
        """1.0 once a signal arrived, else 0.0: the value this rank adds to the loop's collective."""
        return 0.0 if self.received is None else 1.0
