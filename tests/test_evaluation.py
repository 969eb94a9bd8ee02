"""Scoring gathered logits: the metric modules' own formulas, without evaluate's Arrow round trip."""

import numpy as np
import pytest

from swa_accel.runner.evaluation import load_metrics, score


def test_score_gives_what_compute_gives_for_every_shipped_metric():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=200)
    references = rng.integers(0, 3, size=200)
    predictions = probs.argmax(-1)
    binary = (predictions > 0).astype(int), (references > 0).astype(int)
    metrics = load_metrics(["accuracy", "nll", "ece", "f1", "matthews_correlation"])
    cases = {"accuracy": (predictions, references, {}), "nll": (probs, references, {}),
             "ece": (probs, references, {}), "f1": (predictions, references, {"average": "macro"}),
             "matthews_correlation": (*binary, {})}
    for name, (inputs, refs, kwargs) in cases.items():
        ours = score(metrics[name], predictions=inputs, references=refs, **kwargs)
        theirs = metrics[name].compute(predictions=inputs, references=refs, **kwargs)
        assert ours.keys() == theirs.keys() and all(ours[k] == pytest.approx(theirs[k], rel=1e-12) for k in ours)
    assert 0.2 < score(metrics["accuracy"], predictions=predictions, references=references)["accuracy"] < 0.5
