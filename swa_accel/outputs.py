"""What a run leaves behind: resolved config, metrics.jsonl, curves.png and the closing table."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Optional

import yaml

from .candidates import Choice


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


def write_candidates(path: Path, choice: Choice) -> None:
    """final/candidates.json: every candidate average with its start, kind, size and metrics per split."""
    path.write_text(json.dumps(choice.record(), indent=2), encoding="utf-8")


def candidates_table(choice: Choice) -> str:
    """One row per candidate: kind, start, updates, then NLL and accuracy per split; the chosen one marked."""
    candidates = choice.candidates
    splits = list(candidates[0].metrics)
    metrics = [m for m in ("nll", "accuracy") if all(m in c.metrics[s] for c in candidates for s in splits)]
    header = ["", "candidate", "start epoch", "updates"] + [f"{s} {m}" for s in splits for m in metrics]
    rows = [["*" if c.name == choice.chosen else "", c.name, f"{c.start_epoch:g}", str(c.n_averaged)]
            + [f"{c.metrics[s][m]:.4f}" for s in splits for m in metrics] for c in candidates]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in [header] + rows)


def plot_curves(records: list[dict], lr_by_step: list[float], swa_start_step: Optional[int], metric: str,
                path: Path, choice: Optional[Choice] = None) -> None:
    """Validation metric (base vs SWA, per split) and LR against optimizer step, SWA start marked.

    With several candidate averages, a middle panel shows each one's final validation `selection_metric`
    at its start step (SWA starts as points, side EMAs as horizontal lines), the chosen one starred.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    if choice is not None and choice.is_a_choice:
        fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 8), sharex=True, height_ratios=[3, 2, 1])
        plot_candidates(middle, choice)
    else:
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


def plot_candidates(axis, choice: Choice) -> None:
    split, metric = choice.selection_split, choice.selection_metric
    swa = [(c.start_step, c.metrics[split][metric]) for c in choice.candidates if c.kind == "swa"]
    if swa:
        axis.plot([s for s, _ in swa], [v for _, v in swa], marker="o", markersize=4, label="SWA from step")
    for c in choice.candidates:
        if c.kind == "ema":
            axis.axhline(c.metrics[split][metric], linestyle="--", linewidth=1, color="gray")
            axis.annotate(c.name, (0.01, c.metrics[split][metric]), fontsize=7, color="gray",
                          xycoords=("axes fraction", "data"))
    best = choice.best
    axis.plot([best.start_step], [best.metrics[split][metric]], marker="*", markersize=14, color="red",
              linestyle="none", label=f"chosen: {best.name}")
    axis.set_ylabel(f"final {split} {metric}")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)


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
