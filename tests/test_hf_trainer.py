"""SWA in `transformers.Trainer` (swa_accel.hf_trainer), end to end through recipes/hf_trainer.py and the real
`accelerate launch`, with 1 and 2 CPU processes: a BatchNorm ResNet and the tiny BERT of the text tests."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from swa_accel.batchnorm import bn_order
from tests.helpers.launch import ROOT, launch
from tests.helpers.tiny_glue import make_glue_like, make_tiny_bert

SCRIPT = ROOT / "recipes" / "hf_trainer.py"


def run(out, *args, processes=1):
    return launch(SCRIPT, ["--output_dir", str(out), *args], num_processes=processes, env={"PYTHONPATH": str(ROOT)})


def snapshot_mean(folder) -> dict:
    snapshots = [load_file(p) for p in sorted(folder.glob("*.safetensors"))]
    return len(snapshots), {name: torch.stack([s[name].double() for s in snapshots]).mean(0) for name in snapshots[0]}


def global_step(out) -> int:
    """The last optimizer step: the newest checkpoint's number (the recipe saves at every epoch end)."""
    return max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def reference_bn(model, total_steps: int, batch: int) -> dict:
    """torch's update_bn over the batches the recompute reads (seeded order, whole training set), in one process."""
    from torch.optim.swa_utils import update_bn

    from recipes.hf_trainer import DigitsDataset

    data = DigitsDataset("train")
    order = bn_order(len(data), 0, total_steps)
    batches = [data.images[order[i:i + batch]] for i in range(0, len(order), batch)]
    update_bn(batches, model)
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


@pytest.mark.parametrize("processes,batch", [(1, 32), (2, 16)])
def test_a_batchnorm_model_in_hf_trainer_averages_its_snapshots_recomputes_bn_and_loads(tmp_path, processes, batch):
    from transformers import ResNetForImageClassification

    out = tmp_path / "image"
    result = run(out, "--batch_size", str(batch), "--save_snapshots", processes=processes)
    count, mean = snapshot_mean(out / "snapshots")
    assert count == 3  # the ends of epochs 4, 5 and 6 (averaging starts after epoch 3)
    final = load_file(out / "final" / "model.safetensors")
    for name, value in mean.items():
        torch.testing.assert_close(final[name].double(), value, atol=1e-5, rtol=0)
    # The SWA phase ran at swa_lr from the optimizer the Trainer built, and the log says so.
    state = json.loads((out / "checkpoint-228" / "trainer_state.json").read_text()) if processes == 1 else None
    if state is not None:
        rates = [row["learning_rate"] for row in state["log_history"] if "learning_rate" in row]
        assert rates[0] == pytest.approx(0.05) and rates[-1] == pytest.approx(0.02)

    # BN statistics are the averaged model's own, over the whole training set, as update_bn gives them.
    model = ResNetForImageClassification.from_pretrained(out / "final")
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    expected = reference_bn(model, global_step(out), batch)
    assert saved and all(torch.allclose(saved[k], expected[k], atol=1e-5) for k in saved)
    assert int(final["resnet.embedder.embedder.normalization.num_batches_tracked"]) == -(-1200 // batch)

    # from_pretrained gives the evaluated model: its validation accuracy is the one reported.
    from recipes.hf_trainer import DigitsDataset

    data = DigitsDataset("validation")
    model.eval()
    with torch.no_grad():
        accuracy = (model(pixel_values=data.images).logits.argmax(-1) == data.labels).float().mean().item()
    reported = json.loads((out / "final" / "swa_eval.json").read_text())
    assert accuracy == pytest.approx(reported["eval_accuracy"], abs=1e-6) and accuracy > 0.85
    assert f"swa eval accuracy {reported['eval_accuracy']:.4f}; 3 snapshots averaged" in result.stdout


def test_resume_through_trainer_restores_the_average_bit_identically(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = ["--swa_update_every_steps", "5", "--save_steps", "50"]
    run(whole, *args)
    # A run stopped after step 150 (averaging from step 114, every 5 steps: 7 updates): its checkpoint, resumed.
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-150", resumed / "checkpoint-150")
    state = torch.load(resumed / "checkpoint-150" / "swa_state.pt", weights_only=True)
    assert state["averager"]["n_averaged"] == 7 and state["swa"]["steps_done"] == 150
    run(resumed, *args, "--resume_from_checkpoint", "latest")
    ours, theirs = (load_file(p / "final" / "model.safetensors") for p in (resumed, whole))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_checkpoint_without_swa_state_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    run(out, "--epochs", "1", "--swa_start_epoch", "0")
    (out / "checkpoint-38" / "swa_state.pt").unlink()
    result = launch(SCRIPT, ["--output_dir", str(out), "--epochs", "1", "--swa_start_epoch", "0",
                             "--resume_from_checkpoint", str(out / "checkpoint-38")], check=False,
                    env={"PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    assert "resume_from_checkpoint: " in result.stderr and "holds no swa_state.pt" in result.stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_the_tiny_bert_in_hf_trainer_exports_an_average_that_pipeline_loads(tmp_path, processes):
    from transformers import pipeline

    data, bert = tmp_path / "glue", tmp_path / "bert"
    make_glue_like(data, "sst2", n_train=64, n_eval=32)
    make_tiny_bert(bert)
    out = tmp_path / "text"
    run(out, "--task", "text", "--model_name_or_path", str(bert), "--dataset_name", str(data), "--epochs", "4",
        "--batch_size", str(16 // processes), "--learning_rate", "0.5", "--swa_start_epoch", "2", "--swa_lr", "0.1",
        "--swa_update_every_steps", "1", "--save_snapshots", processes=processes)
    count, mean = snapshot_mean(out / "snapshots")
    assert count == 8  # every optimizer step of epochs 3 and 4 (4 steps each)
    final = load_file(out / "final" / "model.safetensors")
    for name, value in mean.items():
        torch.testing.assert_close(final[name].double(), value, atol=1e-5, rtol=0)
    classify = pipeline("text-classification", model=str(out / "final"), device="cpu")
    labels = {row["label"] for row in classify(["a wonderful film", "a dull and tedious plot"])}
    assert labels <= {"negative", "positive"}


def test_add_swa_refuses_what_it_would_silently_drop():
    from swa_accel import ConfigError, SWAArguments
    from swa_accel.hf_trainer import add_swa

    with pytest.raises(ConfigError, match="^swa_start_candidates: add_swa keeps one average"):
        add_swa(None, SWAArguments(swa_start_candidates="every_epoch"))
    with pytest.raises(ConfigError, match="^ema_decays: add_swa keeps one average"):
        add_swa(None, SWAArguments(ema_decays="0.9"))
    with pytest.raises(ConfigError, match="^swa_method: 'none' averages nothing"):
        add_swa(None, SWAArguments(swa_method="none"))
