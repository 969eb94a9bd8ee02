"""Negative log-likelihood of the reference labels under predicted probabilities (local evaluate module)."""

import datasets
import evaluate
import numpy as np


class NLL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean of -log p(reference) over samples.",
            citation="",
            inputs_description="predictions: per-sample class probabilities; references: true label ids.",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        probs = np.asarray(predictions, dtype=np.float64)
        picked = probs[np.arange(len(probs)), np.asarray(references)]
        # Clip so that one confident mistake gives a large, finite loss instead of inf.
        return {"nll": float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))}
