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
    return {name: t.detach().to("cpu", dtype=torch.float32, copy=True) for name, t in tensors.items()}


class BackgroundWriter:
    """Writes tensor files on one background thread, in the order they were handed over."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    def submit(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Queues `tensors` (CPU copies the caller no longer changes) for `path`."""
        self._put(path, tensors)

    def submit_json(self, path: Path, record: dict) -> None:
        """Queues a JSON file, written after everything queued before it (an index names only written files)."""
        self._put(path, json.dumps(record, indent=1))

    def _put(self, path: Path, content) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="swa-snapshot-writer", daemon=True)
            self._thread.start()
        self._queue.put((path, content))

    def _work(self) -> None:
        while True:
            path, content = self._queue.get()
            try:
                if self._error is None and isinstance(content, str):
                    temporary = path.with_name(path.name + ".tmp")
                    temporary.write_text(content)
                    os.replace(temporary, path)
                elif self._error is None:
                    write_tensors(path, content)
            except BaseException as error:  # kept for wait(), which the training thread calls
                self._error = error
            finally:
                self._queue.task_done()

    def wait(self) -> None:
        """Blocks until every queued file is written; raises the first write error."""
        self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(f"snapshot store: a snapshot could not be written: {error}") from error
