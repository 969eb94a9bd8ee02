"""Evaluation on sharded loaders: gather logits with `gather_for_metrics`, score with `evaluate` modules.

Metrics that `evaluate` would fetch from the Hub (unreachable offline) ship as local modules in
`swa_accel/metrics/<name>/`; any other name is passed to `evaluate.load` as is.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional

import torch

from ..batches import forward_logits

LOCAL_METRICS = Path(__file__).parent / "metrics"
PROBABILITY_METRICS = ("nll", "ece")


def load_metrics(names: list[str], main_process_first: Callable = contextlib.nullcontext) -> dict:
    """Loads each metric once; local modules first, so nothing is fetched for the shipped ones."""
    import evaluate  # imported here: it costs seconds, and only a training run needs it

    metrics = {}
    # evaluate copies module scripts into its cache; let the main process do it before the others read it.
    with main_process_first():
        for name in names:
            local = LOCAL_METRICS / name
            metrics[name] = evaluate.load(str(local) if local.is_dir() else name, keep_in_memory=True)
    return metrics


def compute_metrics(metrics: dict, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Scores logits against labels with every loaded metric."""
    probs = torch.softmax(logits.double(), dim=-1)
    predictions = probs.argmax(dim=-1).cpu().numpy()
    references = labels.cpu().numpy()
    results: dict[str, float] = {}
    for name, metric in metrics.items():
        kwargs = {}
        if name == "f1" and probs.shape[-1] > 2:
            kwargs["average"] = "macro"  # binary F1 is undefined for more than two classes
        inputs = probs.cpu().numpy() if name in PROBABILITY_METRICS else predictions
        results.update(score(metric, predictions=inputs, references=references, **kwargs))
    return results


def score(metric, **inputs) -> dict:
    """The metric module's own formula on inputs already gathered from every rank.

    `compute()` would first write them into an Arrow table, for a cross-process gather that `gather_for_metrics`
    has done already: 2 to 4 ms per call, more than scoring itself (a few microseconds for accuracy and NLL),
    and a dozen calls per evaluation. `_compute` is the method every `evaluate` module defines for its formula.
    """
    formula = getattr(metric, "_compute", None)
    return metric.compute(**inputs) if formula is None else formula(**inputs)


@torch.no_grad()
def predict(model: torch.nn.Module, loader, accelerator, input_dtype: Optional[torch.dtype] = None):
    """Logits and labels of the whole (sharded) loader, gathered on every rank without padded duplicates."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for batch in loader:
        with accelerator.autocast():
            logits, labels = forward_logits(model, batch, input_dtype)
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        all_logits.append(logits)
        all_labels.append(labels)
    model.train(was_training)
    if not all_logits:
        raise ValueError("evaluation: the evaluation loader gave no batch")
    # One copy to the host for the whole split: no batch waits for the device.
    return torch.cat(all_logits).cpu(), torch.cat(all_labels).cpu()


def evaluate_model(model, loader, accelerator, metrics: dict, input_dtype: Optional[torch.dtype] = None) -> dict:
    """Runs `predict` then `compute_metrics`."""
    logits, labels = predict(model, loader, accelerator, input_dtype)
    return compute_metrics(metrics, logits, labels)
