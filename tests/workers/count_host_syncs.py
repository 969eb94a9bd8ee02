"""Runs the vision recipe in this process and records every host-device sync call the loop makes.

A `TorchFunctionMode` sees each tensor method call. The calls that make the host wait for the
device on an accelerator (`item`, `tolist`, `cpu`, `bool(tensor)`, a blocking copy to the host, ...)
are recorded with the loop phase they happened in: inside a logging step (allowed: that is where
the loss is read) or in the steps between two logging steps (none allowed).

Usage: python tests/workers/count_host_syncs.py REPORT.json [recipe args ...]
"""

import json
import sys
import traceback
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.vision import train as vision_recipe  # noqa: E402
from swa_accel.runner.cli import run_recipe  # noqa: E402
from swa_accel.runner.loop import RecipeTrainer  # noqa: E402

SYNC_METHODS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "nonzero",
                "masked_select", "unique", "equal", "allclose", "is_nonzero", "any", "all"}


def copies_to_host(args, kwargs) -> bool:
    """`tensor.to(...)` that blocks: from a device to the CPU, not marked non_blocking.

    (On a CPU-only machine every tensor is on the host, so this can only fire where a device exists;
    `.cpu()` above is counted everywhere.)"""
    if kwargs.get("non_blocking") or not isinstance(args[0], torch.Tensor) or args[0].device.type == "cpu":
        return False
    targets = list(args[1:]) + [kwargs.get("device")]
    return any(isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu" for t in targets)


class HostSyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.phase = None  # None: not counting; "between": between logging steps; "logging": inside one
        self.calls = {"logging": [], "pending": []}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if self.phase and (name in SYNC_METHODS or (name == "to" and copies_to_host(args, kwargs))):
            where = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in traceback.extract_stack()[-6:-1]]
            self.calls["pending" if self.phase == "between" else "logging"].append({"call": name, "stack": where})
        return func(*args, **kwargs)


def main():
    report_path, recipe_args = Path(sys.argv[1]), sys.argv[2:]
    counter = HostSyncCounter()
    windows = []
    original = RecipeTrainer.log_training_progress

    def counted_logging(self, progress):
        # Count from the end of one logging step to the start of the next; a logging step itself may sync.
        step = self.state.global_step
        if step % self.training.logging_steps:
            return original(self, progress)  # not a logging step: it must not sync, and is counted
        if counter.phase == "between":
            # A window closes: what it saw counts. Calls after the last logging step (the final
            # evaluation) belong to no window and are dropped.
            windows.append({"ends_at": step, "calls": counter.calls["pending"]})
            counter.calls["pending"] = []
        counter.phase = "logging"
        original(self, progress)
        counter.phase = "between"

    # What the trackers receive: accelerate's `log`, recorded as called (no tracker package needed).
    tracked = []
    real_log = Accelerator.log

    def recording_log(self, values, step=None, log_kwargs=None):
        tracked.append({"step": step, **{k: float(v) for k, v in values.items()}})
        return real_log(self, values, step=step, log_kwargs=log_kwargs)

    RecipeTrainer.log_training_progress = counted_logging
    Accelerator.log = recording_log
    with counter:
        run_recipe(vision_recipe.setup, recipe_args)
    report = {"windows": windows, "logging": counter.calls["logging"], "tracked": tracked}
    report_path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
