"""F1 score through scikit-learn (local evaluate module; binary by default, as GLUE's MRPC/QQP use)."""

import datasets
import evaluate
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Harmonic mean of precision and recall.",
            citation="",
            inputs_description="predictions, references: label ids; average: binary (default), macro, micro, weighted.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary"):
        return {"f1": float(f1_score(references, predictions, average=average))}
