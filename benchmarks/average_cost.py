"""What the average costs inside the default job's training loop, from each run's own final/timings.json.

    python benchmarks/average_cost.py [--runs 2] [-- --extra --recipe overrides]

Reports, per run of `recipes/vision/configs/digits_small_cnn.yaml` (checkpoints as configured):
- training steps: the loop's time less its evaluations, BN passes and checkpoints;
- the BN passes' time as a share of the training steps (target: at most 10%);
- the evaluations' time (both models, every split) as a share of the whole loop (target: at most 20%).
The final evaluation (every candidate, full BN passes) comes after the loop and is reported apart
(`final_evaluation`; its own phases are `after_loop_<phase>` in timings.json).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "vision" / "configs" / "digits_small_cnn.yaml"


def one_run(out: Path, overrides: list[str]) -> dict:
    command = [sys.executable, str(ROOT / "recipes/vision/train.py"), "--config", str(CONFIG), "--output_dir",
               str(out), "--plot", "false", *overrides]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(command, check=True, capture_output=True, env=env, cwd=ROOT)
    timings = json.loads((out / "final" / "timings.json").read_text())
    loop = timings["total"]
    steps = loop - sum(timings.get(k, 0.0) for k in ("evaluation", "bn_recompute", "checkpointing"))
    return {"loop_s": round(loop, 3), "training_steps_s": round(steps, 3),
            "bn_recompute_s": round(timings.get("bn_recompute", 0.0), 3),
            "evaluation_s": round(timings.get("evaluation", 0.0), 3),
            "checkpointing_s": round(timings.get("checkpointing", 0.0), 3),
            "bn_share_of_training_steps": round(timings.get("bn_recompute", 0.0) / steps, 3),
            "evaluation_share_of_loop": round(timings.get("evaluation", 0.0) / loop, 3),
            "final_evaluation_s": round(timings.get("final_evaluation", 0.0), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, after --")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one_run(Path(tmp) / f"run{i}", args.overrides) for i in range(args.runs)]
    print(json.dumps({"command": "python benchmarks/average_cost.py " + " ".join(sys.argv[1:]),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
