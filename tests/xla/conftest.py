"""The XLA suite: runs on XLA's CPU device (PJRT_DEVICE=CPU), never skips.

`./run.sh test-xla` builds the venv with torch_xla and sets PJRT_DEVICE; run by hand elsewhere, a missing
torch_xla fails here with the command to use instead.
"""

import importlib.util
import os

if importlib.util.find_spec("torch_xla") is None:
    raise RuntimeError("tests/xla needs torch_xla: run ./run.sh test-xla, which builds .venv-xla with it")
os.environ.setdefault("PJRT_DEVICE", "CPU")
