"""Expected calibration error with equal-width confidence bins (local evaluate module)."""

import datasets
import evaluate
import numpy as np


class ECE(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Sum over confidence bins of |accuracy - confidence| weighted by the bin's share.",
            citation="Guo et al., On Calibration of Modern Neural Networks, 2017.",
            inputs_description="predictions: per-sample class probabilities; references: true label ids; "
            "num_bins: number of equal-width bins (default 15).",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_bins=15):
        probs = np.asarray(predictions, dtype=np.float64)
        confidence = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == np.asarray(references)).astype(np.float64)
        # Bin i holds confidences in (i/num_bins, (i+1)/num_bins]; confidence 0 cannot occur.
        bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
        ece = 0.0
        for b in range(num_bins):
            members = bins == b
            if members.any():
                ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
        return {"ece": float(ece)}
