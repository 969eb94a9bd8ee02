"""Matthews correlation coefficient through scikit-learn (local evaluate module; GLUE's CoLA metric)."""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Correlation between predicted and true labels, in [-1, 1].",
            citation="",
            inputs_description="predictions, references: label ids.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
