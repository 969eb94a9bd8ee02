"""Runs the vision recipe on several command lines that it must refuse, in one process, so that the imports are
paid once: prints, per command line, one JSON line with the exit status and the last line on stderr.

    python refusals.py '[["--config", "...", ...], ...]'
"""

import contextlib
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.vision.train import setup  # noqa: E402
from swa_accel.runner.cli import run_recipe  # noqa: E402

for argv in json.loads(sys.argv[1]):
    stderr, code = io.StringIO(), 0
    with contextlib.redirect_stderr(stderr):
        try:
            run_recipe(setup, argv)
        except SystemExit as exit_:
            code = exit_.code
    lines = stderr.getvalue().strip().splitlines()
    print(json.dumps({"code": code, "last": lines[-1] if lines else ""}), flush=True)
