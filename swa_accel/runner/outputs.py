"""What a run leaves behind: resolved config, metrics.jsonl, curves.png and the closing table."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Optional

import yaml

from ..candidates import Choice


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

    def start(self, resumed_at: Optional[int]) -> None:
        """A fresh run starts an empty log; a resumed one keeps the records up to its checkpoint's step."""
        if resumed_at is not None:
            self.truncate_after(resumed_at)
        elif self.path.exists():
            self.path.unlink()

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


def finished_run(output_dir: Path, total_steps: int) -> bool:
    """Whether `output_dir` holds a run that finished this budget: its final results, and final metrics records
    written after optimizer step `total_steps`."""
    log = output_dir / "metrics.jsonl"
    if not (output_dir / "final" / "results.json").is_file() or not log.is_file():
        return False
    return any(r.get("final") and r["step"] >= total_steps for r in read_metrics(log))


def launch_record(accelerator, model) -> dict[str, Any]:
    """The launch as accelerate saw it, for config.yaml."""
    from accelerate.utils import is_compiled_module

    return {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
            "dynamo_backend": str(accelerator.state.dynamo_plugin.backend.value).lower(),
            "compiled": is_compiled_module(model)}


def log_evaluation(log: Optional[MetricsLog], accelerator, results: dict, choice: Optional[Choice], step: int,
                   epoch: int, lr: float, n_averaged: int, final: bool) -> None:
    """One evaluation's records: metrics.jsonl rows (`log` None off the main process) and tracker scalars, every
    candidate's too when there was a choice (a single candidate is the "swa" record itself)."""
    candidates = choice.candidates if choice is not None and choice.is_a_choice else []
    if log is not None:
        # Each average says which it is and how many updates it holds: the final "swa" is the chosen candidate.
        chosen = {} if choice is None else {"candidate": choice.chosen, "n_averaged": choice.best.n_averaged}
        scored = [(model_name, by_split, chosen if model_name == "swa" else {})
                  for model_name, by_split in results.items()]
        scored += [("candidate", c.metrics, {"candidate": c.name, "n_averaged": c.n_averaged}) for c in candidates]
        for model_name, by_split, extra in scored:
            for split, values in by_split.items():
                record = {"step": step, "epoch": epoch, "model": model_name, "split": split, **values, "lr": lr,
                          "n_averaged": n_averaged, **extra}
                if final:
                    record["final"] = True
                log.append(record)
    scalars = {f"{m}/{s}/{k}": v for m, by in results.items() for s, vals in by.items() for k, v in vals.items()}
    scalars.update({f"candidates/{c.name}/{s}/{k}": v for c in candidates
                    for s, vals in c.metrics.items() for k, v in vals.items()})
    accelerator.log(scalars, step=step)


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
                path: Path, choice: Optional[Choice] = None, steps_per_epoch: int = 1) -> None:
    """Against epochs (the configs' unit): the task's metric and the NLL (which picks the candidate), base vs SWA per
    split; each candidate's final validation score at its start, the chosen one starred (when there was a choice);
    the learning rate. The SWA start is marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    metrics = [name for name in dict.fromkeys([metric, "nll"]) if any(name in r for r in records)]
    with_choice = choice is not None and choice.is_a_choice
    ratios = [3] * len(metrics) + ([2] if with_choice else []) + [1]
    fig, axes = plt.subplots(len(ratios), 1, figsize=(8, 2 + 2 * len(ratios)), sharex=True, height_ratios=ratios)
    curves, rate = axes[:len(metrics)], axes[-1]
    for axis, name in zip(curves, metrics):
        for model, style in (("base", "-"), ("swa", "--")):
            for split in sorted({r["split"] for r in records}):
                points = [(r["step"] / steps_per_epoch, r[name]) for r in records
                          if r["model"] == model and r["split"] == split and name in r]
                if points:
                    xs, ys = zip(*points)
                    axis.plot(xs, ys, style, marker="o", markersize=3, label=f"{model} / {split}")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    if with_choice:
        plot_candidates(axes[len(metrics)], choice, steps_per_epoch)
    rate.plot([(step + 1) / steps_per_epoch for step in range(len(lr_by_step))], lr_by_step, color="black")
    rate.set_ylabel("learning rate")
    rate.set_xlabel("epoch")
    rate.grid(alpha=0.3)
    if swa_start_step is not None:
        for axis in (*curves, rate):
            axis.axvline(swa_start_step / steps_per_epoch, color="red", linestyle=":", label="SWA start")
    for axis in curves:
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_candidates(axis, choice: Choice, steps_per_epoch: int = 1) -> None:
    split, metric = choice.selection_split, choice.selection_metric
    swa = [(c.start_step / steps_per_epoch, c.metrics[split][metric]) for c in choice.candidates if c.kind == "swa"]
    if swa:
        axis.plot([s for s, _ in swa], [v for _, v in swa], marker="o", markersize=4, label="SWA from epoch")
    for c in choice.candidates:
        if c.kind == "ema":
            axis.axhline(c.metrics[split][metric], linestyle="--", linewidth=1, color="gray")
            axis.annotate(c.name, (0.01, c.metrics[split][metric]), fontsize=7, color="gray",
                          xycoords=("axes fraction", "data"))
    best = choice.best
    axis.plot([best.start_step / steps_per_epoch], [best.metrics[split][metric]], marker="*", markersize=14,
              color="red", linestyle="none", label=f"chosen: {best.name}")
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


def write_final_records(final_dir: Path, results: dict, choice: Optional[Choice], timings: dict,
                        xla_report: Optional[dict]) -> None:
    """final/: results.json, candidates.json (when averaging ran), timings.json and, under XLA, xla_counters.json."""
    final_dir.mkdir(parents=True, exist_ok=True)
    if choice is not None:
        write_candidates(final_dir / "candidates.json", choice)
    (final_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    # Phase timings of this process (total = the training loop; final_evaluation and after_loop_* = after it).
    (final_dir / "timings.json").write_text(json.dumps(timings, indent=2), encoding="utf-8")
    if xla_report is not None:  # graphs compiled and device-to-host copies, per phase
        (final_dir / "xla_counters.json").write_text(json.dumps(xla_report, indent=2), encoding="utf-8")


def print_closing_table(results: dict, choice: Optional[Choice]) -> None:
    legend = "base = last iterate, swa = the chosen average" if "swa" in results else "the last iterate; no average"
    print(f"\nfinal evaluation ({legend}):")
    print(summary_table(results))
    if choice is not None and choice.is_a_choice:
        print(f"\ncandidates (scored on '{choice.selection_split}'; the other splits only report):")
        print(candidates_table(choice))
    if choice is not None:
        print(f"chosen: {choice.chosen}: {choice.reason}")
