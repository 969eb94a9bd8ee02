"""A real tracker: the smoke recipe with --report_to tensorboard, read back from its event files."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from swa_accel.runner.outputs import read_metrics
from tests.helpers.launch import ROOT, launch

SCRIPT = ROOT / "recipes" / "vision" / "train.py"
SMOKE = ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"


def test_tensorboard_receives_the_training_loss_lr_and_both_models_metrics(tmp_path):
    out = tmp_path / "run"
    # 256 samples in batches of 32: 24 steps in 3 epochs; the loss is read at steps 10, 20 and the last, 24.
    launch(SCRIPT, ["--config", str(SMOKE), "--output_dir", str(out), "--report_to", "tensorboard",
                    "--logging_steps", "10", "--checkpointing_steps", "none", "--plot", "false"])
    event_files = list((out / "logs").rglob("events.out.tfevents.*"))
    assert event_files, "no tensorboard event file written"
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}

    assert sorted(scalars["train/loss"]) == [10, 20, 24]
    assert all(0.0 < loss < 5.0 for loss in scalars["train/loss"].values())
    # SWA starts after epoch 1 (step 8) and anneals from 0.1 to swa_lr 0.05 over the next epoch.
    assert 0.05 < scalars["train/lr"][10] < 0.1
    assert scalars["train/lr"][20] == pytest.approx(0.05) and scalars["train/lr"][24] == pytest.approx(0.05)
    assert scalars["train/epoch"] == {10: pytest.approx(1.25), 20: pytest.approx(2.5), 24: pytest.approx(3.0)}

    # Evaluation: the base model at every epoch end, the average once it exists; the same values as metrics.jsonl.
    records = read_metrics(out / "metrics.jsonl")
    for record in records:
        tag = f"{record['model']}/{record['split']}/accuracy"
        assert scalars[tag][record["step"]] == pytest.approx(record["accuracy"], abs=1e-6)
        assert scalars[f"{record['model']}/{record['split']}/nll"][record["step"]] == pytest.approx(record["nll"],
                                                                                                   rel=1e-6)
    assert sorted(scalars["base/test/accuracy"]) == [8, 16, 24]
    assert sorted(scalars["swa/test/accuracy"]) == [16, 24]
