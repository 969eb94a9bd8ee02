"""`--sync_batchnorm`: the vision recipe on 2 processes x 16 with synchronised BatchNorm ends where 1 process x 32
ends (to float32 rounding), and without it clearly elsewhere; the synced layer against nn.BatchNorm on the
concatenated batch in a real 2-process gloo group; the one-process and XLA cases of the runner's hook."""

import json
import types

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForImageClassification

from recipes.vision import hf_models  # noqa: F401  (registers the recipe's model with the Auto classes)
from recipes.vision.data import VisionDataArguments, load_vision_data
from recipes.vision.image_tensors import identity_collate
from swa_accel.errors import ConfigError
from swa_accel.runner.evaluation import compute_metrics, load_metrics, predict
from swa_accel.runner.outputs import read_metrics
from swa_accel.runner.sync_bn import synced_batchnorm
from tests.helpers.launch import ROOT, launch
from tests.helpers.one_process import OneProcess

SCRIPT = ROOT / "recipes" / "vision" / "train.py"
SMOKE = ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"

#: Largest difference allowed between 1 x 32 and 2 x 16 synced, relative to each tensor's scale (`relative_gap`).
#: Measured: 4.7e-7 (base) and 6.2e-7 (swa), max abs 8e-7 on a BN running mean. The two runs differ only in float32
#: summation order (the per-rank sums and all-reduces of the synced statistics, DDP's averaged gradients, the BN
#: recompute's combine), and 24 SGD steps carry those few ulps forward.
RUN_TOLERANCE = 1e-5
#: Without sync_batchnorm the same pair ends 7.1e-2 (base) and 8.6e-2 (swa) apart by that measure (0.35 and 0.37 as
#: relative norms of the difference): per-process BN statistics, and nothing else, move the whole trajectory.
RUN_GAP = 1e-2
#: The synced layer against nn.BatchNorm on the concatenated batch, relative to each tensor's scale: a few float32
#: ulps (measured at most 5.1e-7).
LAYER_TOLERANCE = 2e-6


def smoke_args(out, batch_size: int, *extra: str) -> list[str]:
    # digits: 256 training samples, 8 global batches of 32 per epoch, 3 epochs, averaging at epoch ends from epoch
    # 1. The BN recompute reads batches of 32 on either launch, so that its per-batch statistics are the same ones.
    return ["--config", str(SMOKE), "--output_dir", str(out), "--per_device_train_batch_size", str(batch_size),
            "--bn_recompute_batch_size", "32", "--checkpointing_steps", "None", "--plot", "false", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sync_bn")
    one = launch(SCRIPT, smoke_args(base / "one", 32, "--sync_batchnorm", "true"))
    synced = launch(SCRIPT, smoke_args(base / "synced", 16, "--sync_batchnorm", "true"), num_processes=2)
    per_process = launch(SCRIPT, smoke_args(base / "per_process", 16), num_processes=2)
    return {"one": (base / "one", one), "synced": (base / "synced", synced),
            "per_process": (base / "per_process", per_process)}


def relative_gap(first, second, which: str) -> float:
    """The largest difference between two runs' exported tensors, relative to the larger of 1 and each tensor's
    largest magnitude."""
    a = load_file(first / "final" / which / "model.safetensors")
    b = load_file(second / "final" / which / "model.safetensors")
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp(min=1.0)).item()
               for k in a if a[k].is_floating_point())


def test_two_processes_synced_end_where_one_process_ends_and_unsynced_do_not(runs):
    one, synced, per_process = (runs[name][0] for name in ("one", "synced", "per_process"))
    for out, processes in ((one, 1), (synced, 2), (per_process, 2)):
        assert yaml.safe_load((out / "config.yaml").read_text())["launch"]["num_processes"] == processes
    assert yaml.safe_load((synced / "config.yaml").read_text())["config"]["sync_batchnorm"] is True
    assert "sync_batchnorm: one process, whose batch statistics are already the whole batch's" in runs["one"][1].stdout
    assert "sync_batchnorm: 4 BatchNorm layers normalise with the statistics of the global batch (2 processes)" \
        in runs["synced"][1].stdout
    assert "sync_batchnorm" not in runs["per_process"][1].stdout
    for which in ("base", "swa"):  # the last iterate, and the average with its BN recomputed
        assert relative_gap(one, synced, which) < RUN_TOLERANCE, which
        assert relative_gap(one, per_process, which) > RUN_GAP, which


def final_metrics(out, model: str) -> dict:
    return next(r for r in read_metrics(out / "metrics.jsonl") if r.get("final") and r["model"] == model)


def test_the_synced_runs_exports_load_with_plain_batchnorm_and_reproduce_their_metrics(runs):
    """final/base is the training model itself (synced layers), final/swa a fresh build_model(): both load with
    from_pretrained as ordinary BatchNorm2d layers and score what the run logged."""
    out = runs["synced"][0]
    data = load_vision_data(VisionDataArguments(dataset_name="digits", label_noise=0.3, max_train_samples=256))
    loader = torch.utils.data.DataLoader(data.evals["test"], batch_size=64, collate_fn=identity_collate)
    for which in ("base", "swa"):
        model = AutoModelForImageClassification.from_pretrained(out / "final" / which)
        norms = [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms == [nn.BatchNorm2d] * 4, which
        saved = load_file(out / "final" / which / "model.safetensors")
        assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items()), which
        logits, labels = predict(model, loader, OneProcess)
        again = compute_metrics(load_metrics(["accuracy", "nll"]), logits, labels)
        logged = final_metrics(out, which)
        assert logged["split"] == "test" and again["accuracy"] == pytest.approx(logged["accuracy"], abs=1e-9)
        assert again["nll"] == pytest.approx(logged["nll"], abs=1e-5), which


def test_the_synced_layer_matches_batchnorm_on_the_concatenated_batch(tmp_path):
    report_path = tmp_path / "report.json"
    launch(ROOT / "tests" / "workers" / "sync_bn_layer.py", [str(report_path)], num_processes=2)
    report = json.loads(report_path.read_text())
    assert report["world_size"] == 2
    for name in ("bn2d", "bn1d_cumulative"):  # momentum 0.1, and None (the cumulative average)
        layer = report[name]
        assert layer["type"] == "SyncedBatchNorm" and layer["found_by_recompute"] == 1
        for key in ("output", "input_grad", "param_grad", "running_mean", "running_var", "eval_output"):
            assert layer[key] < LAYER_TOLERANCE, (name, key, layer[key])
        assert layer["num_batches_tracked"] == 2
        # Under no_grad a training forward is nn.BatchNorm on this rank's share, bit for bit, and far from the
        # global batch's normalisation.
        assert layer["no_grad_vs_local"] == 0.0 and layer["no_grad_vs_global"] > 1e-2
    recompute = report["recompute"]  # ranks with 3 and 2 batches against one process with all 5
    assert recompute["batches"] == recompute["batches_alone"] == 5 and recompute["state_keys_equal"]
    assert recompute["statistics"] < LAYER_TOLERANCE


def stand_in(num_processes: int, distributed_type: str = "MULTI_CPU"):
    """What `synced_batchnorm` reads of an Accelerator."""
    return types.SimpleNamespace(num_processes=num_processes, is_main_process=True, device=torch.device("cpu"),
                                 distributed_type=types.SimpleNamespace(value=distributed_type))


def test_the_hook_leaves_one_process_alone_and_refuses_xla(capsys):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    assert synced_batchnorm(model, False, stand_in(2)) is model and type(model[1]) is nn.BatchNorm2d
    assert capsys.readouterr().out == ""
    assert synced_batchnorm(model, True, stand_in(1)) is model and type(model[1]) is nn.BatchNorm2d
    assert capsys.readouterr().out.startswith("sync_batchnorm: one process")
    with pytest.raises(ConfigError, match="^sync_batchnorm: not available under XLA"):
        synced_batchnorm(model, True, stand_in(2, "XLA"))
    plain = nn.Sequential(nn.Linear(2, 2))
    assert synced_batchnorm(plain, True, stand_in(2)) is plain
    assert "the model has no BatchNorm layer" in capsys.readouterr().out
