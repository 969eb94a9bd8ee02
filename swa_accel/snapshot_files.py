"""The snapshot store's files: tensors written atomically in the background, and read back one file at a time.

Each file is one safetensors dict of fp32 CPU tensors, written to a temporary name and renamed into place, so a
reader (or a resumed run) never sees half a file. `BackgroundWriter` does the writing on one thread: the training
step hands it CPU copies and goes on; `wait()` returns once everything handed over is on disk (before a checkpoint
names those files, and at the end), and raises the first error a write met.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path
from typing import Optional

import torch

from .xla_sync import mark_step


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """`tensors` (CPU) at `path`, atomically."""
    from safetensors.torch import save_file

    temporary = path.with_name(path.name + ".tmp")
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(temporary))
    os.replace(temporary, path)


def read_tensors(path: Path, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device or "cpu"))


def cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies that the step may go on changing the originals under (fp32, on the CPU)."""
    if any(t.device.type == "xla" for t in tensors.values()):
        mark_step()  # (XLA: the pending trace runs first; a copy of a tensor still in it can fail in torch_xla 2.9)
    return {name: t.detach().to("cpu", dtype=torch.float32, copy=True) for name, t in tensors.items()}


class BackgroundWriter:
    """Writes tensor files on one background thread, in the order they were handed over.

    Args:
        max_pending_bytes: the most bytes of copies waiting to be written; a file that would go past it waits
            for earlier ones (always admitted when nothing waits). It bounds the memory the copies take when the
            disk is slower than the points come (measured on a 100M-parameter model with a point every 2 steps:
            unbounded, the queue held 5 copies at once). None: no bound.
    """

    def __init__(self, max_pending_bytes: Optional[int] = None) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self.max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0
        self._room = threading.Condition()

    def submit(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Queues fp32 CPU copies of `tensors` for `path`, taken once the pending copies leave room for them (the
        caller may change the originals as soon as this returns)."""
        self._put(path, tensors)

    def submit_delete(self, path: Path) -> None:
        """Queues the removal of `path`, done after everything queued before it (so never before its own write)."""
        self._put(path, None)

    def submit_json(self, path: Path, record: dict) -> None:
        """Queues a JSON file, written after everything queued before it (an index names only written files)."""
        self._put(path, json.dumps(record, indent=1))

    def _put(self, path: Path, content) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="swa-snapshot-writer", daemon=True)
            self._thread.start()
        size = 0 if content is None or isinstance(content, str) else sum(4 * t.numel() for t in content.values())
        with self._room:
            while (self.max_pending_bytes is not None and self._pending_bytes > 0
                   and self._pending_bytes + size > self.max_pending_bytes):
                self._room.wait()
            self._pending_bytes += size
        if isinstance(content, dict):
            content = cpu_copy(content)
        self._queue.put((path, content, size))

    def _work(self) -> None:
        while True:
            path, content, size = self._queue.get()
            try:
                if self._error is None and content is None:
                    path.unlink(missing_ok=True)
                elif self._error is None and isinstance(content, str):
                    temporary = path.with_name(path.name + ".tmp")
                    temporary.write_text(content)
                    os.replace(temporary, path)
                elif self._error is None:
                    write_tensors(path, content)
            except BaseException as error:  # kept for wait(), which the training thread calls
                self._error = error
            finally:
                del content  # (the copy's memory goes back before the next file is admitted)
                with self._room:
                    self._pending_bytes -= size
                    self._room.notify_all()
                self._queue.task_done()

    def wait(self) -> None:
        """Blocks until every queued file is written; raises the first write error."""
        self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(f"snapshot store: a snapshot could not be written: {error}") from error
