"""The vision recipe end to end through the real launcher: outputs, reload, candidates, LR parity, resume, the
sharded placement (bad input: test_vision_bad_input.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from recipes.vision.data import VisionDataArguments, load_vision_data
from recipes.vision.hf_models import SWACNNForImageClassification
from swa_accel.runner.evaluation import compute_metrics, load_metrics, predict
from recipes.vision.image_tensors import identity_collate
from swa_accel.runner.outputs import read_metrics
from tests.helpers.final_weights import assert_same_final_weights
from tests.helpers.launch import ROOT, launch
from tests.helpers.one_process import OneProcess
from tests.helpers.vision_runs import SCRIPT, common, make_cifar_dir

@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return make_cifar_dir(tmp_path_factory.mktemp("cifar"))


# One run, many averages: the SWA start (epoch 2: 4 updates), a later start (epoch 3: 2 updates, a window of the
# snapshot store), a side EMA, and the store's families (LAWA, post-hoc EMA, BEMA, the window that ends at epoch 3
# of 4) and the soup.
CANDIDATES = ("--swa_start_candidates", "every_epoch", "--ema_decays", "0.5", "--snapshot_every", "every_epoch",
              "--lawa_ks", "1,2", "--bema", "true", "--store_windows", "2-3", "--soup", "true")


@pytest.fixture(scope="module")
def runs(cifar_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("vision_runs")
    one = launch(SCRIPT, common(cifar_dir, base / "one", "--per_device_train_batch_size", "16", *CANDIDATES))
    two = launch(SCRIPT, common(cifar_dir, base / "two", "--per_device_train_batch_size", "8", *CANDIDATES),
                 num_processes=2)
    accum = launch(SCRIPT, common(cifar_dir, base / "accum", "--per_device_train_batch_size", "8",
                                  "--gradient_accumulation_steps", "2", "--checkpointing_steps", "None"))
    return {"one": (base / "one", one), "two": (base / "two", two), "accum": (base / "accum", accum)}


def final_record(out: Path, model: str, split: str = "test") -> dict:
    return next(r for r in read_metrics(out / "metrics.jsonl")
                if r.get("final") and r["model"] == model and r["split"] == split)


@pytest.mark.parametrize("name,processes", [("one", 1), ("two", 2)])
def test_outputs_exist_and_final_swa_reproduces_the_logged_metric(runs, cifar_dir, name, processes):
    out, result = runs[name]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["launch"]["num_processes"] == processes
    assert resolved["config"]["model_name"] == "preresnet"
    for path in ("metrics.jsonl", "curves.png", "final/base/model.safetensors", "final/swa/model.safetensors",
                 "final/swa/config.json", "final/results.json", "final/candidates.json"):
        assert (out / path).is_file(), path
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    # Every 3 steps, and the last (step 16): a run that keeps the store checkpoints where choose_from_store starts.
    assert checkpoints == ["step_00000015", "step_00000016"]  # total limit 2, newest kept
    for step in ("step_00000015", "step_00000016"):
        assert (out / "checkpoints" / step / "swa_model" / "model.safetensors").is_file()
    assert "final evaluation" in result.stdout and "swa" in result.stdout

    records = read_metrics(out / "metrics.jsonl")
    assert {r["model"] for r in records if r["step"] <= 8} == {"base"}  # SWA reported only once averaging began
    swa = final_record(out, "swa")
    chosen = json.loads((out / "final" / "candidates.json").read_text())
    updates = {c["name"]: c["n_averaged"] for c in chosen["candidates"]}
    assert swa["step"] == 16 and updates["swa_from_epoch_2"] == 4  # every 2 steps from step 8
    assert (swa["candidate"], swa["n_averaged"]) == (chosen["chosen"], updates[chosen["chosen"]])

    # The same rows as the run (normalisation statistics come from its train split, after the carve).
    data = load_vision_data(VisionDataArguments(dataset_name=str(cifar_dir), max_train_samples=80,
                                                validation_fraction=0.2))
    model = AutoModelForImageClassification.from_pretrained(out / "final" / "swa")
    assert isinstance(model, SWACNNForImageClassification) and model.config.architecture == "preresnet"
    assert model.config.id2label[0] == "airplane"
    loader = torch.utils.data.DataLoader(data.evals["test"], batch_size=8, collate_fn=identity_collate)
    logits, labels = predict(model, loader, OneProcess)
    again = compute_metrics(load_metrics(["accuracy", "nll"]), logits, labels)
    assert again["accuracy"] == pytest.approx(swa["accuracy"], abs=1e-9)
    assert again["nll"] == pytest.approx(swa["nll"], abs=1e-5)
    # The export carries its preprocessing (the training split's mean and std, the image size): the test images,
    # as a user would have them (PIL), go through AutoImageProcessor to the recipe's own predictions.
    processor = AutoImageProcessor.from_pretrained(out / "final" / "swa")
    images = list(datasets.load_dataset(str(cifar_dir), split="test")["img"])
    with torch.no_grad():
        theirs = model.eval()(processor(images, return_tensors="pt")["pixel_values"]).logits
    assert torch.equal(theirs.argmax(-1), logits.argmax(-1)) and torch.allclose(theirs, logits, atol=1e-4)
    # BN statistics were recomputed: they differ from the last iterate's.
    base_state = load_file(out / "final" / "base" / "model.safetensors")
    swa_state = load_file(out / "final" / "swa" / "model.safetensors")
    bn_key = next(k for k in swa_state if k.endswith("running_mean"))
    assert not torch.equal(base_state[bn_key], swa_state[bn_key])


def recipe_logits(cifar_dir, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The exported model's logits on the test split as the recipe's evaluation computes them."""
    data = load_vision_data(VisionDataArguments(dataset_name=str(cifar_dir), max_train_samples=80,
                                                validation_fraction=0.2))
    model = AutoModelForImageClassification.from_pretrained(folder)
    loader = torch.utils.data.DataLoader(data.evals["test"], batch_size=8, collate_fn=identity_collate)
    return predict(model, loader, OneProcess)


def classify_elsewhere(folder: Path, cifar_dir, tmp_path, trust_remote_code: bool) -> dict:
    """`pipeline("image-classification")` on the test split's PIL images, from a folder outside the repository
    and with nothing of it importable (tests/workers/classify_with_pipeline.py)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    command = [sys.executable, str(ROOT / "tests" / "workers" / "classify_with_pipeline.py"), str(folder),
               str(cifar_dir), "test"] + (["--trust_remote_code"] if trust_remote_code else [])
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_pipeline_matches_the_recipe(answer: dict, logits: torch.Tensor) -> None:
    assert answer["labels"][:2] == ["airplane", "automobile"]
    scores = torch.tensor(answer["scores"], dtype=torch.float64)
    torch.testing.assert_close(scores, torch.softmax(logits.double(), -1), atol=1e-5, rtol=1e-4)
    assert torch.equal(scores.argmax(-1), logits.argmax(-1))


def test_the_recipe_cnn_export_classifies_new_images_through_pipeline_elsewhere(runs, cifar_dir, tmp_path):
    """The PreResNet export carries its code: `pipeline(..., trust_remote_code=True)` loads it on a machine without
    this repository and gives the recipe's own probabilities on the test images."""
    folder = runs["one"][0] / "final" / "swa"
    assert {"hf_models.py", "models.py", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    logits, _ = recipe_logits(cifar_dir, folder)
    answer = classify_elsewhere(folder, cifar_dir, tmp_path, trust_remote_code=True)
    assert answer["model_class"].startswith("transformers_modules.")
    assert answer["model_class"].endswith(".hf_models.SWACNNForImageClassification")
    assert_pipeline_matches_the_recipe(answer, logits)


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory):
    """A small BatchNorm ResNet of transformers, saved as a 'pretrained' checkpoint with a 3-class head."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("resnet_checkpoint")
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=3)
    ResNetForImageClassification(config).save_pretrained(folder)
    return folder


def test_a_transformers_resnet_checkpoint_trains_end_to_end_with_exact_bn_and_pipeline(
        cifar_dir, resnet_checkpoint, tmp_path):
    """`--model_name_or_path` with a transformers BN ResNet on 2 processes: a new 10-class head, the average's BN
    statistics recomputed over the whole training split across both ranks, and an export that transformers'
    own classes and `pipeline` load without remote code, giving the recipe's predictions."""
    out = tmp_path / "resnet"
    launch(SCRIPT, common(cifar_dir, out, "--per_device_train_batch_size", "8", "--model_name_or_path",
                          str(resnet_checkpoint), "--augment", "false", "--bn_recompute_batch_size", "16",
                          "--checkpointing_steps", "None"), num_processes=2)
    folder = out / "final" / "swa"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "resnet" and len(config["id2label"]) == 10 and "auto_map" not in config
    assert not (folder / "hf_models.py").exists()

    logits, labels = recipe_logits(cifar_dir, folder)
    swa = final_record(out, "swa")
    again = compute_metrics(load_metrics(["accuracy", "nll"]), logits, labels)
    assert again["accuracy"] == pytest.approx(swa["accuracy"], abs=1e-9)
    assert again["nll"] == pytest.approx(swa["nll"], abs=1e-5)

    # The stem's BN sees the training images through the stem conv alone, so its recomputed running mean is the
    # mean of that conv's output over the whole training split (64 rows: 4 equal BN batches over 2 ranks).
    model = AutoModelForImageClassification.from_pretrained(folder)
    stem = model.resnet.embedder.embedder
    data = load_vision_data(VisionDataArguments(dataset_name=str(cifar_dir), max_train_samples=80,
                                                validation_fraction=0.2))
    pixels = next(iter(torch.utils.data.DataLoader(data.train, batch_size=len(data.train),
                                                   collate_fn=identity_collate)))["pixel_values"]
    assert pixels.shape[0] == 64
    with torch.no_grad():
        expected = stem.convolution(pixels).mean(dim=(0, 2, 3))
    torch.testing.assert_close(stem.normalization.running_mean, expected, atol=1e-5, rtol=1e-5)
    base = AutoModelForImageClassification.from_pretrained(out / "final" / "base").resnet.embedder.embedder
    assert not torch.allclose(base.normalization.running_mean, expected, atol=1e-3)

    answer = classify_elsewhere(folder, cifar_dir, tmp_path, trust_remote_code=False)
    assert answer["model_class"] == "transformers.models.resnet.modeling_resnet.ResNetForImageClassification"
    assert_pipeline_matches_the_recipe(answer, logits)


@pytest.mark.parametrize("name", ["one", "two"])
def test_candidates_are_listed_and_the_chosen_one_is_exported(runs, name):
    out, result = runs[name]
    report = json.loads((out / "final" / "candidates.json").read_text())
    candidates = {c["name"]: c for c in report["candidates"]}
    families = ["lawa_last_1", "lawa_last_2", *(f"posthoc_ema_{w}" for w in ("0.02", "0.05", "0.1", "0.15", "0.2")),
                "bema", "window_epochs_2_3", "soup"]
    assert list(candidates) == ["swa_from_epoch_2", "swa_from_epoch_3", "ema_0.5", *families]
    assert [c["kind"] for c in candidates.values()] == ["swa", "swa", "ema", "lawa", "lawa", *["posthoc_ema"] * 5,
                                                        "bema", "window", "soup"]
    # LAWA: its points (the last and the last two of epochs 3 and 4, as the SWA windows from epochs 3 and 2); the
    # EMAs: the store's folds; the window: its own.
    assert [c["n_averaged"] for c in list(candidates.values())[:-1]] == [4, 2, 4, 1, 2] + [4] * 6 + [2]
    assert [c["start_epoch"] for c in list(candidates.values())[:-1]] == [2, 3, 2, 3, 2] + [2] * 7
    soup = candidates["soup"]
    assert soup["start_epoch"] == min(candidates[n]["start_epoch"] for n in soup["settings"]["ingredients"])
    assert candidates["lawa_last_2"]["settings"] == {"k": 2}
    assert candidates["soup"]["settings"]["ingredients"][0] == min(
        list(candidates)[:-1], key=lambda n: candidates[n]["metrics"]["validation"]["nll"])
    assert report["selection_split"] == "validation" and report["selection_metric"] == "nll"
    for c in candidates.values():
        assert set(c["metrics"]) == {"validation", "test"}
    # The choice is the lowest validation NLL, and what was exported and logged as "swa" is that candidate.
    best = min(candidates, key=lambda n: candidates[n]["metrics"]["validation"]["nll"])
    assert report["chosen"] == best
    results = json.loads((out / "final" / "results.json").read_text())
    assert results["swa"] == candidates[best]["metrics"]
    # The end's time: building the candidates' weights is a phase of its own within it.
    timings = json.loads((out / "final" / "timings.json").read_text())
    assert 0 < timings["after_loop_candidate_builds"] < timings["final_evaluation"]
    assert final_record(out, "swa", "validation")["nll"] == candidates[best]["metrics"]["validation"]["nll"]
    logged = {r["candidate"] for r in read_metrics(out / "metrics.jsonl") if r["model"] == "candidate"}
    assert logged == set(candidates)
    assert f"chosen: {best}: " in result.stdout and "swa_from_epoch_3" in result.stdout
    # The candidates really differ (else the choice would be vacuous).
    assert len({c["metrics"]["validation"]["nll"] for c in list(candidates.values())[:3]}) == 3


def test_one_and_two_processes_give_the_same_candidates(runs):
    def summary(name):
        report = json.loads((runs[name][0] / "final" / "candidates.json").read_text())
        return [(c["name"], c["n_averaged"], c["start_step"]) for c in report["candidates"]]

    assert summary("one") == summary("two")


def test_choosing_from_the_store_on_two_processes_scores_what_the_run_scored(runs, cifar_dir, tmp_path):
    # The 2-process run chosen again from its last checkpoint and store: the main process reads the store's index
    # and hands what it found to the other rank, so both name the same candidates.
    out = tmp_path / "two"
    shutil.copytree(runs["two"][0], out)
    result = launch(SCRIPT, common(cifar_dir, out, "--per_device_train_batch_size", "8", *CANDIDATES,
                                   "--choose_from_store", "true"), num_processes=2)
    assert f"chosen from the store: {out / 'chosen' / 'swa'}" in result.stdout
    run, again = (json.loads((out / folder / "candidates.json").read_text()) for folder in ("final", "chosen"))
    assert again["chosen"] == run["chosen"]
    assert [c["name"] for c in again["candidates"]] == [c["name"] for c in run["candidates"]]
    for a, b in zip(again["candidates"], run["candidates"]):
        assert a["metrics"]["validation"] == pytest.approx(b["metrics"]["validation"], rel=1e-6), a["name"]


def test_the_test_split_cannot_change_the_choice(runs, cifar_dir, tmp_path):
    """Same run, test labels shifted by one class: the validation scores, the choice and the exported weights stay
    bit-identical."""
    import pyarrow.parquet as pq

    shifted = tmp_path / "shifted"
    shutil.copytree(cifar_dir, shifted)
    test_file = next((shifted / "data").glob("test-*.parquet"))
    table = pq.read_table(test_file)
    labels = table.column("label").to_pylist()
    table = table.set_column(table.schema.get_field_index("label"), table.schema.field("label"),
                             [[(label + 1) % 10 for label in labels]])
    pq.write_table(table, test_file)
    out = tmp_path / "run"
    args = common(cifar_dir, out, "--per_device_train_batch_size", "16", *CANDIDATES)
    args[args.index(str(cifar_dir))] = str(shifted)
    launch(SCRIPT, args + ["--checkpointing_steps", "None"])
    original = json.loads((runs["one"][0] / "final" / "candidates.json").read_text())
    again = json.loads((out / "final" / "candidates.json").read_text())
    assert again["chosen"] == original["chosen"]
    for a, b in zip(original["candidates"], again["candidates"]):  # (the store's families and the soup too)
        assert a["metrics"]["validation"] == b["metrics"]["validation"]
        assert a["metrics"]["test"] != b["metrics"]["test"]  # the test split really changed
    exported, exported_again = (load_file(folder / "final" / "swa" / "model.safetensors")
                                for folder in (runs["one"][0], out))
    assert exported.keys() == exported_again.keys()
    assert all(torch.equal(exported[k], exported_again[k]) for k in exported)  # the same weights, bit for bit


def test_the_sharded_placement_in_the_loop_matches_main_and_resumes(runs, cifar_dir, tmp_path):
    """`--swa_placement sharded` on 2 DDP processes, stopped after step 13 and resumed: every rank averages its
    replica and the loop evaluates the average swapped into the training model. The training trajectory is untouched
    (bit-identical base weights to the main placement's uninterrupted run), the candidates and the export agree, and
    each rank checkpoints its own shard file, from which the resumed run goes on. (Resuming from shard files bit for
    bit: tests/test_sharded_placement.py.)"""
    out = tmp_path / "sharded"
    args = common(cifar_dir, out, "--per_device_train_batch_size", "8", *CANDIDATES, "--swa_placement", "sharded")
    launch(SCRIPT, args + ["--stop_after_step", "13"], num_processes=2)
    launch(SCRIPT, args + ["--resume_from_checkpoint", "latest"], num_processes=2)
    main_out = runs["two"][0]
    base, main_base = (load_file(o / "final" / "base" / "model.safetensors") for o in (out, main_out))
    assert all(torch.equal(base[k], main_base[k]) for k in main_base)
    swa, main_swa = (load_file(o / "final" / "swa" / "model.safetensors") for o in (out, main_out))
    for key in main_swa:
        torch.testing.assert_close(swa[key], main_swa[key], rtol=1e-5, atol=1e-6)
    ours, theirs = (json.loads((o / "final" / "candidates.json").read_text()) for o in (out, main_out))
    assert ours["chosen"] == theirs["chosen"]
    assert [c["name"] for c in ours["candidates"]] == [c["name"] for c in theirs["candidates"]]
    for a, b in zip(ours["candidates"], theirs["candidates"]):
        assert a["metrics"]["validation"]["nll"] == pytest.approx(b["metrics"]["validation"]["nll"], rel=1e-5)
    checkpoint = out / "checkpoints" / "step_00000015"
    assert sorted(p.name for p in checkpoint.glob("swa_average_rank*")) == [
        "swa_average_rank00000_of_00002.pt", "swa_average_rank00001_of_00002.pt"]
    # The LR schedule and the loop position only: no rank-0-only copy of the average. Each rank's file holds the SWA
    # object's whole state: its step count and its own shards.
    assert sorted(p.name for p in checkpoint.glob("custom_checkpoint_*")) == [
        "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"]
    for shard in checkpoint.glob("swa_average_rank*"):
        state = torch.load(shard, weights_only=True)["owner"]
        assert state["steps_done"] == 15 and state["averager"]["n_averaged"] > 0


def test_lr_per_step_is_the_same_for_processes_and_accumulation(runs):
    def lr_by_step(name):
        out = runs[name][0]
        return [(r["step"], r["lr"]) for r in read_metrics(out / "metrics.jsonl")
                if r["model"] == "base" and r["split"] == "test"]

    one = lr_by_step("one")
    assert len(one) == 8 and one[-1][0] == 16
    assert lr_by_step("two") == one
    assert lr_by_step("accum") == one
    assert len({lr for _, lr in one}) > 1  # the anneal really moved the LR
    # Averaging counts optimizer steps too: every 2 steps from step 8 is 3 updates by the evaluation at step 14,
    # whatever the layout.
    assert {max(r["n_averaged"] for r in read_metrics(runs[name][0] / "metrics.jsonl")
                if r["model"] == "swa" and not r.get("final")) for name in runs} == {3}


def test_ema_with_bf16_weights_and_bf16_autocast_keeps_an_fp32_average(cifar_dir, tmp_path):
    out = tmp_path / "ema"
    launch(SCRIPT, common(cifar_dir, out, "--per_device_train_batch_size", "16", "--swa_method", "ema",
                          "--ema_decay", "0.8", "--swa_update_every_steps", "1", "--model_dtype", "bfloat16",
                          "--checkpointing_steps", "None"), launcher_args=("--mixed_precision", "bf16"))
    assert yaml.safe_load((out / "config.yaml").read_text())["launch"]["mixed_precision"] == "bf16"
    base = load_file(out / "final" / "base" / "model.safetensors")
    ema = load_file(out / "final" / "swa" / "model.safetensors")
    weight = next(k for k in base if k.endswith("conv1.weight"))
    assert base[weight].dtype == torch.bfloat16 and ema[weight].dtype == torch.float32
    # The fp32 EMA is not just the bf16 weights cast up: it carries bits bf16 cannot hold.
    assert not torch.equal(ema[weight], ema[weight].bfloat16().float())
    record = final_record(out, "swa")
    assert record["n_averaged"] == 8 and 0.0 <= record["accuracy"] <= 1.0


def test_resume_after_a_checkpoint_gives_bit_identical_final_weights(runs, cifar_dir, tmp_path):
    straight = runs["one"][0]
    out = tmp_path / "resumed"
    args = common(cifar_dir, out, "--per_device_train_batch_size", "16")
    # Mid-epoch, after averaging began and after the later candidate (epoch 3 = step 12) stored its copy.
    launch(SCRIPT, args + [*CANDIDATES, "--stop_after_step", "13"])
    assert not (out / "final").exists()
    assert (out / "checkpoints" / "step_00000013").is_dir()
    launch(SCRIPT, args + [*CANDIDATES, "--resume_from_checkpoint", "latest"])
    assert_same_final_weights(straight, out)
    assert read_metrics(out / "metrics.jsonl") == read_metrics(straight / "metrics.jsonl")
    assert (out / "final" / "candidates.json").read_text() == (straight / "final" / "candidates.json").read_text()
    # Each final record says which average it is: candidates carry their own update counts, "swa" its candidate.
    chosen = json.loads((straight / "final" / "candidates.json").read_text())
    updates = {c["name"]: c["n_averaged"] for c in chosen["candidates"]}
    final = [r for r in read_metrics(straight / "metrics.jsonl") if r.get("final")]
    assert {r["candidate"]: r["n_averaged"] for r in final if r["model"] == "candidate"} == updates
    assert len(set(updates.values())) > 1
    assert {(r["candidate"], r["n_averaged"]) for r in final if r["model"] == "swa"} == {
        (chosen["chosen"], updates[chosen["chosen"]])}


def test_a_launch_that_starts_fewer_processes_than_asked_for_says_so(runs, cifar_dir, tmp_path):
    """`--num_processes 2` with a one-process config runs one process on a CPU machine: the run says so, with the
    numbers and the fix. A launch that got what it asked for says nothing."""
    out = tmp_path / "one_of_two"
    result = launch(SCRIPT, common(cifar_dir, out, "--max_train_steps", "5", "--swa_start_epoch", "none",
                                   "--swa_start_step", "1", "--checkpointing_steps", "None"),
                    launcher_args=("--num_processes", "2"))
    assert yaml.safe_load((out / "config.yaml").read_text())["launch"]["num_processes"] == 1
    assert "warning: the launch asked for 2 processes (--num_processes 2) but this run has 1; " in result.stdout
    assert "asked for" not in runs["two"][1].stdout and "asked for" not in runs["one"][1].stdout
