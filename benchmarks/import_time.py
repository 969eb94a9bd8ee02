"""What `import swa_accel` costs over `import torch`, in fresh processes (median of --repeats).

    .venv/bin/python benchmarks/import_time.py [--repeats 7] [--root PATH]

`--root` points at another checkout (e.g. an older commit in a git worktree) to compare before and after.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = """
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import swa_accel
t2 = time.perf_counter()
heavy = sorted(m for m in ("transformers", "datasets", "evaluate", "yaml", "accelerate") if m in sys.modules)
print(t1 - t0, t2 - t1, ",".join(heavy))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    args = parser.parse_args()
    torch_s, extra_s, heavy = [], [], ""
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=args.root, capture_output=True, text=True,
                             check=True).stdout.split()
        torch_s.append(float(out[0]))
        extra_s.append(float(out[1]))
        heavy = out[2] if len(out) > 2 else ""
    torch_median, extra_median = statistics.median(torch_s), statistics.median(extra_s)
    print(json.dumps({"root": args.root, "import_torch_s": round(torch_median, 3),
                      "import_swa_accel_over_torch_s": round(extra_median, 3),
                      "ratio_total_to_torch": round((torch_median + extra_median) / torch_median, 3),
                      "heavy_modules_loaded": heavy or "none"}))


if __name__ == "__main__":
    main()
