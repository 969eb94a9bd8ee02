"""What a run leaves behind: resolved config, metrics.jsonl, curves.png and the closing table."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Optional

import yaml


def git_commit() -> Optional[str]:
    """The repo's current commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def write_resolved_config(output_dir: Path, config: dict[str, Any], argv: list[str], launch: dict[str, Any]) -> None:
    """Writes config.yaml: every resolved value, the launch as accelerate saw it, the command line, the commit."""
    record = {"config": config, "launch": launch, "argv": argv, "git_commit": git_commit()}
    (output_dir / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")


class MetricsLog:
    """Appends one JSON object per evaluation to metrics.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drops records newer than a resumed checkpoint, which the resumed run will write again."""
        if self.path.exists():
            kept = [r for r in self.read() if r["step"] <= step and not r.get("final")]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(records: list[dict], lr_by_step: list[float], swa_start_step: Optional[int], metric: str,
                path: Path) -> None:
    """Validation metric (base vs SWA, per split) and LR against optimizer step, SWA start marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    for model, style in (("base", "-"), ("swa", "--")):
        for split in sorted({r["split"] for r in records}):
            points = [(r["step"], r[metric]) for r in records if r["model"] == model and r["split"] == split]
            if points:
                xs, ys = zip(*points)
                top.plot(xs, ys, style, marker="o", markersize=3, label=f"{model} / {split}")
    top.set_ylabel(metric)
    top.legend()
    top.grid(alpha=0.3)
    bottom.plot(range(1, len(lr_by_step) + 1), lr_by_step, color="black")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    if swa_start_step is not None:
        for axis in (top, bottom):
            axis.axvline(swa_start_step, color="red", linestyle=":", label="SWA start")
        top.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(final: dict[str, dict[str, dict[str, float]]]) -> str:
    """A plain-text table: one row per (split, metric), one column per model."""
    models = list(final)
    rows = []
    for split in final[models[0]]:
        for metric in final[models[0]][split]:
            values = [final[m].get(split, {}).get(metric) for m in models]
            rows.append([split, metric] + ["-" if v is None else f"{v:.4f}" for v in values])
    header = ["split", "metric"] + models
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header] + rows]
    return "\n".join(lines)
