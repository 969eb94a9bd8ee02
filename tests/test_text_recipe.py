"""Tests of the text recipe (recipes/text/train.py) through the real `accelerate launch`.

Everything runs offline: GLUE-schema data written locally by `make_glue_like` (loaded through the
same `datasets.load_dataset` path as nyu-mll/glue) and a tiny BERT built from a config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from recipes.text.data import TextDataArguments, default_model_path, load_text_data
from recipes.text.train import TextModelArguments, task_metrics
from swa_accel import SWAArguments, recompute_bn
from swa_accel.runner import RunArguments, parse_config
from swa_accel.batchnorm import batchnorm_layers, shard_loader
from swa_accel.runner.outputs import read_metrics
from tests.helpers.launch import ROOT, launch, run_python
from tests.helpers.tiny_glue import make_glue_like, make_tiny_bert

SCRIPT = ROOT / "recipes" / "text" / "train.py"
CONFIG_DIR = ROOT / "recipes" / "text" / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "wordnet_sentiment_minilm.yaml"
ARG_TYPES = (TextDataArguments, TextModelArguments, RunArguments, SWAArguments)
N_TRAIN = 96  # a multiple of 32: no partial batch at per-device 8, 16 or 32
MAX_LENGTH = 64

LABELS = {"sst2": ["negative", "positive"], "mrpc": ["not_equivalent", "equivalent"]}

# A short AdamW run with warmup + linear decay, then SWA over the second half, averaging every 2 steps.
E2E_ARGS = [
    "--optimizer", "adamw", "--learning_rate", "3e-3", "--weight_decay", "0.01", "--no_decay_on_bias_and_norm", "true",
    "--lr_scheduler_type", "linear", "--num_warmup_steps", "2", "--num_train_epochs", "4",
    "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--max_length", str(MAX_LENGTH),
    "--swa_start_epoch", "2", "--swa_lr", "1e-3", "--swa_anneal_steps", "2", "--swa_update_every_steps", "2",
    "--checkpointing_steps", "epoch", "--checkpoints_total_limit", "2", "--seed", "0",
]

# Dropout off and plain SGD: the runs below must agree to float rounding.
EQUIV_ARGS = [
    "--dataset_config_name", "sst2", "--dropout_off", "true", "--optimizer", "sgd", "--learning_rate", "1.0",
    "--momentum", "0.9", "--lr_scheduler_type", "linear", "--num_warmup_steps", "1", "--max_train_steps", "6",
    "--swa_start_step", "2", "--swa_lr", "0.5", "--swa_anneal_steps", "2", "--swa_update_every_steps", "1",
    "--eval_every_epochs", "100", "--checkpointing_steps", "none", "--plot", "false", "--max_eval_samples", "32",
    "--max_length", str(MAX_LENGTH), "--seed", "0",
]


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    make_glue_like(root, "sst2", n_train=N_TRAIN, n_eval=32)
    make_glue_like(root, "mrpc", n_train=N_TRAIN, n_eval=32)
    return root


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def data_args(glue_dir, tiny_bert, task: str) -> list[str]:
    return ["--model_name_or_path", str(tiny_bert), "--dataset_name", str(glue_dir), "--dataset_config_name", task]


def final_record(out: Path, model: str, split: str = "validation") -> dict:
    records = [r for r in read_metrics(out / "metrics.jsonl")
               if r.get("final") and r["model"] == model and r["split"] == split]
    assert len(records) == 1, records
    return records[0]


def recompute(folder: Path, glue_dir: Path, task: str) -> tuple[float, float, list[int]]:
    """Accuracy, NLL and predictions of a saved model on the raw validation split, scored here."""
    raw = datasets.load_dataset(str(glue_dir), task)["validation"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    if task == "mrpc":
        enc = tokenizer(list(raw["sentence1"]), list(raw["sentence2"]), padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
    else:
        enc = tokenizer(list(raw["sentence"]), padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
    labels = torch.tensor(list(raw["label"]))
    with torch.no_grad():
        logits = model(**enc).logits.double()
    predictions = logits.argmax(-1)
    accuracy = (predictions == labels).double().mean().item()
    nll = nn.functional.cross_entropy(logits, labels).item()
    return accuracy, nll, predictions.tolist()


def check_run(out: Path, glue_dir: Path, task: str, num_processes: int, steps_per_epoch: int) -> None:
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "final/base", "final/swa", "final/results.json"):
        assert (out / name).exists(), name
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints and all(name.startswith("step_") for name in checkpoints), checkpoints
    assert (out / "checkpoints" / checkpoints[-1] / "swa_model" / "config.json").is_file()

    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["launch"]["num_processes"] == num_processes
    assert written["config"]["label_names"] == LABELS[task]
    records = read_metrics(out / "metrics.jsonl")
    # The per-epoch evaluations land on multiples of the per-process step count: with 2 processes
    # each one sees half the batches, so an epoch takes half as many optimizer steps.
    assert sorted({r["step"] for r in records if r["epoch"] >= 1}) == [steps_per_epoch * e for e in range(1, 5)]
    assert set(task_metrics(task)) <= set(records[-1])

    # final/swa is the very module evaluated last: reloading it reproduces the logged metric.
    swa = final_record(out, "swa")
    assert swa["n_averaged"] > 1
    accuracy, nll, predictions = recompute(out / "final" / "swa", glue_dir, task)
    assert accuracy == pytest.approx(swa["accuracy"], abs=1e-9)
    assert nll == pytest.approx(swa["nll"], abs=1e-5)
    base_accuracy, base_nll, _ = recompute(out / "final" / "base", glue_dir, task)
    assert base_accuracy == pytest.approx(final_record(out, "base")["accuracy"], abs=1e-9)
    assert base_nll == pytest.approx(final_record(out, "base")["nll"], abs=1e-5)

    # The exported folder works in a pipeline and speaks the configured label names.
    classifier = pipeline("text-classification", model=str(out / "final" / "swa"), device="cpu")
    raw = datasets.load_dataset(str(glue_dir), task)["validation"]
    if task == "mrpc":
        inputs = [{"text": a, "text_pair": b} for a, b in zip(list(raw["sentence1"])[:8], list(raw["sentence2"])[:8])]
    else:
        inputs = list(raw["sentence"])[:8]
    outputs = classifier(inputs)
    assert [o["label"] for o in outputs] == [LABELS[task][p] for p in predictions[:8]]


def test_end_to_end_one_process_sst2(glue_dir, tiny_bert, tmp_path):
    out = tmp_path / "run"
    launch(SCRIPT, data_args(glue_dir, tiny_bert, "sst2") + E2E_ARGS + ["--output_dir", str(out)], num_processes=1)
    check_run(out, glue_dir, "sst2", num_processes=1, steps_per_epoch=N_TRAIN // 16)
    # The synthetic sst2 task is learnable: the averaged model must have learned it.
    assert final_record(out, "swa")["accuracy"] >= 0.9


def test_end_to_end_two_processes_mrpc(glue_dir, tiny_bert, tmp_path):
    out = tmp_path / "run"
    result = launch(SCRIPT, data_args(glue_dir, tiny_bert, "mrpc") + E2E_ARGS + ["--output_dir", str(out)],
                    num_processes=2)
    # Only the main process prints the closing table.
    assert result.stdout.count("final evaluation (base = last iterate, swa = the chosen average)") == 1
    check_run(out, glue_dir, "mrpc", num_processes=2, steps_per_epoch=N_TRAIN // 16 // 2)


# ----- BatchNorm recompute on a transformer ------------------------------------------------------------


class ExplodingDataset(Dataset):
    """Counts reads and fails on any of them."""

    def __init__(self) -> None:
        self.reads = 0

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index):
        self.reads += 1
        raise AssertionError("the BN recompute read a training sample")


def test_bn_recompute_draws_no_batch_for_a_transformer(tiny_bert):
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2).eval()
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert batchnorm_layers(model) == []
    before = {k: v.clone() for k, v in model.state_dict().items()}

    dataset, calls = ExplodingDataset(), []

    def loader_factory():
        calls.append(1)
        return DataLoader(dataset, batch_size=8)

    assert recompute_bn(model, loader_factory, torch.device("cpu")) == 0
    # The loop's own factory (a sharded loader over the training set) is not even built.
    assert recompute_bn(model, lambda: (calls.append(1), shard_loader(dataset, 8, None, 1, 0, max_samples=32))[1],
                        torch.device("cpu")) == 0
    assert calls == [] and dataset.reads == 0
    assert not model.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


# ----- equivalence with dropout off --------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(glue_dir, tiny_bert, tmp_path_factory):
    """One process, per-device batch 32, no accumulation."""
    out = tmp_path_factory.mktemp("equiv") / "b32x1"
    launch(SCRIPT, data_args(glue_dir, tiny_bert, "sst2") + EQUIV_ARGS
           + ["--per_device_train_batch_size", "32", "--gradient_accumulation_steps", "1", "--output_dir", str(out)])
    return out


def assert_same_weights(a: Path, b: Path, model: str) -> None:
    left = load_file(str(a / "final" / model / "model.safetensors"))
    right = load_file(str(b / "final" / model / "model.safetensors"))
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def check_reference(reference: Path) -> None:
    swa = final_record(reference, "swa")
    assert swa["step"] == 6 and swa["n_averaged"] == 4  # steps 3..6 averaged
    assert [r["step"] for r in read_metrics(reference / "metrics.jsonl")] == [6, 6]  # evaluated only at the end
    # The average really differs from the last iterate, so comparing it is not comparing base twice.
    base = load_file(str(reference / "final" / "base" / "model.safetensors"))
    averaged = load_file(str(reference / "final" / "swa" / "model.safetensors"))
    assert max((base[k] - averaged[k]).abs().max().item() for k in base) > 1e-3


def test_accumulation_matches_large_batch(glue_dir, tiny_bert, reference_run, tmp_path):
    check_reference(reference_run)
    out = tmp_path / "b8x4"
    launch(SCRIPT, data_args(glue_dir, tiny_bert, "sst2") + EQUIV_ARGS
           + ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "4", "--output_dir", str(out)])
    assert_same_weights(out, reference_run, "swa")
    assert_same_weights(out, reference_run, "base")


def test_two_processes_match_one_process(glue_dir, tiny_bert, reference_run, tmp_path):
    out = tmp_path / "2x16"
    launch(SCRIPT, data_args(glue_dir, tiny_bert, "sst2") + EQUIV_ARGS
           + ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1", "--output_dir", str(out)],
           num_processes=2)
    assert yaml.safe_load((out / "config.yaml").read_text())["launch"]["num_processes"] == 2
    assert_same_weights(out, reference_run, "swa")
    assert_same_weights(out, reference_run, "base")


# ----- configs -----------------------------------------------------------------------------------------


def test_default_config_uses_packaged_model_and_data():
    data, model, training, swa = parse_config(ARG_TYPES, ["--config", str(DEFAULT_CONFIG)])
    assert "model_name_or_path" not in yaml.safe_load(DEFAULT_CONFIG.read_text())  # the default is the package
    assert data.model_name_or_path == default_model_path()
    assert data.dataset_name == "wordnet_sentiment"
    assert training.optimizer == "adamw" and training.no_decay_on_bias_and_norm
    assert training.lr_scheduler_type == "linear" and training.num_warmup_steps > 0
    assert swa.swa_method == "swa" and swa.swa_lr is not None

    text = load_text_data(data, AutoTokenizer.from_pretrained(data.model_name_or_path))
    assert text.label_names == ["negative", "neutral", "positive"]
    assert len(text.train) == 1847
    assert {k: len(v) for k, v in text.evals.items()} == {"validation": 395, "test": 395}
    # The CPU budget: at most ~350 optimizer steps of batch 32 (about 0.6 s each on 2 cores).
    steps = math.ceil(len(text.train) / training.per_device_train_batch_size) * training.num_train_epochs
    assert steps <= 350 and training.per_device_train_batch_size == 32 and 32 <= data.max_length <= 48


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_every_config_parses_and_documents_its_command(name):
    path = CONFIG_DIR / name
    header = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    command = f"./run.sh recipes/text/configs/{name}"
    assert command in header, header
    assert any(line.startswith(command + " --") for line in header), "no override example"
    data, model, training, swa = parse_config(ARG_TYPES, ["--config", str(path)])
    if name.startswith("glue_"):
        assert data.dataset_name == "nyu-mll/glue" and data.dataset_config_name in name
        assert training.learning_rate == 2e-5 and training.per_device_train_batch_size == 32
        assert training.num_train_epochs == 3 and data.max_length == 128
        assert training.no_decay_on_bias_and_norm and training.lr_scheduler_type == "linear"
        assert training.num_warmup_steps > 0 and swa.swa_start_fraction == 0.75 and swa.swa_lr == 1e-5
        assert training.checkpointing_steps == "epoch"
    expected_model = {"glue_sst2_bert.yaml": "bert-base-uncased", "glue_mrpc_bert.yaml": "bert-base-uncased",
                      "glue_sst2_roberta.yaml": "roberta-base"}
    if name in expected_model:
        assert data.model_name_or_path == expected_model[name]


def test_task_metrics():
    assert task_metrics("sst2") == ("accuracy", "f1", "nll", "ece")
    assert task_metrics("mrpc") == ("accuracy", "f1", "nll", "ece")
    assert task_metrics(None) == ("accuracy", "f1", "nll", "ece")
    assert task_metrics("cola") == ("accuracy", "f1", "nll", "ece", "matthews_correlation")


STORE = ("--snapshot_every", "every_4_steps", "--lawa_ks", "1,2", "--posthoc_ema_widths", "0.1", "--bema", "true",
         "--soup", "true")


def test_smoke_config_runs_offline(tmp_path):
    out = tmp_path / "smoke"
    # With candidates as fractions of the budget: the SWA start (step 8), step 12, and a side EMA; and the snapshot
    # store's families from points at steps 12 and 16 (a text model: no BN to recompute, a Hub-style export).
    result = launch(SCRIPT, ["--config", str(CONFIG_DIR / "smoke.yaml"), "--output_dir", str(out),
                             "--swa_start_candidates", "0.75", "--ema_decays", "0.5", *STORE])
    assert "final evaluation" in result.stdout
    report = json.loads((out / "final" / "candidates.json").read_text())
    assert report["selection_split"] == "validation"
    assert [(c["name"], c["kind"], c["n_averaged"]) for c in report["candidates"]] == [
        ("swa_from_epoch_1", "swa", 4), ("swa_from_step_12", "swa", 2), ("ema_0.5", "ema", 4),
        ("lawa_last_1", "lawa", 1), ("lawa_last_2", "lawa", 2), ("posthoc_ema_0.1", "posthoc_ema", 4),
        ("bema", "bema", 4), ("soup", "soup", 4)]
    assert {split for c in report["candidates"] for split in c["metrics"]} == {"validation", "test"}
    candidates = {c["name"]: c for c in report["candidates"]}
    # LAWA over the last point is the last iterate: the base model's own scores.
    results = json.loads((out / "final" / "results.json").read_text())
    assert candidates["lawa_last_1"]["metrics"] == results["base"]
    # The soup starts from the best candidate on validation (the greedy rule's first ingredient).
    ingredients = candidates.pop("soup")["settings"]["ingredients"]
    assert ingredients[0] == min(candidates, key=lambda n: candidates[n]["metrics"]["validation"]["nll"])
    assert "posthoc_ema_0.1" in result.stdout and "lawa_last_2" in result.stdout  # the closing table lists them
    chosen = min(report["candidates"], key=lambda c: c["metrics"]["validation"]["nll"])
    assert report["chosen"] == chosen["name"] and f"chosen: {chosen['name']}" in result.stdout
    model = AutoModelForSequenceClassification.from_pretrained(out / "final" / "swa")
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert final_record(out, "swa")["n_averaged"] >= 2


# ----- bad input: one line naming the field, before training ------------------------------------------


@pytest.mark.parametrize(
    ("field", "extra"),
    [
        ("text_column", ["--text_column", "review"]),
        ("label_column", ["--label_column", "sentiment"]),
        ("num_labels", ["--num_labels", "3"]),
        ("model_name_or_path", ["--model_name_or_path", "/nonexistent/tiny_bert"]),
    ],
)
def test_bad_input_is_one_line_before_training(glue_dir, tiny_bert, tmp_path, field, extra):
    out = tmp_path / "run"
    result = run_python(SCRIPT, data_args(glue_dir, tiny_bert, "sst2") + E2E_ARGS + ["--output_dir", str(out)] + extra)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {field}: "), lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.stderr
    assert extra[-1] in lines[-1]  # names the offending value too
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()
