"""The default job (`./run.sh`) end to end: its SWA model beats its last iterate on the clean test split."""

import json

from swa_accel.outputs import read_metrics
from tests.helpers.launch import ROOT, launch

SCRIPT = ROOT / "recipes" / "vision" / "train.py"
DEFAULT = ROOT / "recipes" / "vision" / "configs" / "digits_small_cnn.yaml"


def test_default_job_swa_beats_the_last_iterate(tmp_path):
    # The default config as run.sh runs it, except for checkpoints, which this test does not need.
    launch(SCRIPT, ["--config", str(DEFAULT), "--output_dir", str(tmp_path), "--checkpointing_steps", "None"],
           timeout=900)
    final = {r["model"]: r for r in read_metrics(tmp_path / "metrics.jsonl")
             if r.get("final") and r["split"] == "test"}
    assert final["swa"]["n_averaged"] == 30  # one average per epoch from epoch 10 of 40
    # One run, many averages: every second epoch from 10 to 38 is a candidate start, chosen on validation NLL.
    report = json.loads((tmp_path / "final" / "candidates.json").read_text())
    assert [c["name"] for c in report["candidates"]] == [f"swa_from_epoch_{e}" for e in range(10, 40, 2)]
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    assert chosen["metrics"]["validation"]["nll"] == min(c["metrics"]["validation"]["nll"]
                                                         for c in report["candidates"])
    assert final["swa"]["nll"] == chosen["metrics"]["test"]["nll"]
    # With 30% label noise the last iterate at a high constant LR is erratic; the average is not.
    assert final["swa"]["accuracy"] > final["base"]["accuracy"] + 0.03
    assert final["swa"]["accuracy"] > 0.9
    assert final["swa"]["nll"] < final["base"]["nll"]
