"""Both recipes end to end on XLA's CPU device, through accelerate's TPU launcher.

One uninterrupted run and one stopped-and-resumed run per recipe. They check what a TPU user gets: training,
SWA with later starts and a side EMA chosen on the validation split, BN recompute, evaluations, checkpoints, a
resume that ends bit-identical, exports that load on the CPU, the plot and the closing table; and XLA's own
counters (final/xla_counters.json): no graph compiled after the warm-up, no device-to-host copy between two
logging steps.
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from recipes.vision.data import VisionDataArguments, load_vision_data
from recipes.vision.hf_models import SWACNNForImageClassification
from swa_accel.runner.evaluation import compute_metrics, load_metrics, predict
from recipes.vision.image_tensors import identity_collate
from swa_accel.runner.outputs import read_metrics
from tests.helpers.final_weights import assert_same_final_weights
from tests.helpers.launch import ROOT
from tests.helpers.one_process import OneProcess
from tests.helpers.xla_launch import counters, xla_launch

VISION = ROOT / "recipes" / "vision" / "train.py"
TEXT = ROOT / "recipes" / "text" / "train.py"
# Digits, 256 rows, 20% held out for validation: 204 training rows, 6 steps of 32 per epoch (the last, short
# batch dropped under XLA), 5 epochs; SWA from epoch 1, a later start every epoch, a side EMA, and the snapshot store
# (a point every epoch: the later starts are its windows; LAWA, post-hoc EMA and BEMA).
STORE_ARGS = ["--snapshot_every", "every_epoch", "--lawa_ks", "1,2", "--posthoc_ema_widths", "0.07,0.1", "--bema", "true"]
VISION_ARGS = ["--config", str(ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"), "--validation_fraction", "0.2",
               "--num_train_epochs", "5", "--swa_update_every_steps", "2", "--swa_start_candidates", "every_epoch",
               "--ema_decays", "0.5", "--checkpointing_steps", "epoch", "--logging_steps", "4", *STORE_ARGS]
# A 2-layer BERT, 128 rows padded to 32 tokens, 8 steps of 16 per epoch, 5 epochs; SWA from epoch 1 as well.
TEXT_ARGS = ["--config", str(ROOT / "recipes" / "text" / "configs" / "smoke.yaml"), "--num_train_epochs", "5",
             "--swa_start_fraction", "0.2", "--swa_start_candidates", "every_epoch", "--ema_decays", "0.5",
             "--logging_steps", "4"]
RECIPES = {"vision": (VISION, VISION_ARGS, 12), "text": (TEXT, TEXT_ARGS, 20)}  # (script, args, stop step)


@pytest.fixture(scope="module", params=list(RECIPES))
def runs(request, tmp_path_factory):
    """(name, uninterrupted output, its launch result, resumed output) for each recipe."""
    script, args, stop = RECIPES[request.param]
    base = tmp_path_factory.mktemp(f"xla_{request.param}")
    full = xla_launch(script, args + ["--output_dir", str(base / "full")])
    xla_launch(script, args + ["--output_dir", str(base / "resumed"), "--stop_after_step", str(stop)])
    xla_launch(script, args + ["--output_dir", str(base / "resumed"), "--resume_from_checkpoint", "latest"])
    return request.param, base / "full", full, base / "resumed"


def test_the_run_trained_on_xla_and_wrote_every_output(runs):
    name, out, result, _ = runs
    launch = yaml.safe_load((out / "config.yaml").read_text())["launch"]
    assert launch["distributed_type"] == "DistributedType.XLA" and launch["device"].startswith("xla")
    for path in ("metrics.jsonl", "curves.png", "final/base/model.safetensors", "final/swa/model.safetensors",
                 "final/results.json", "final/candidates.json", "final/xla_counters.json"):
        assert (out / path).is_file(), path
    assert any((out / "checkpoints").glob("step_*/swa_model/model.safetensors"))
    assert "final evaluation" in result.stdout and "chosen: " in result.stdout
    records = read_metrics(out / "metrics.jsonl")
    assert {r["model"] for r in records} == {"base", "swa", "candidate"}
    assert all(r["n_averaged"] > 0 for r in records if r["model"] == "swa")


def test_the_choice_reads_validation_among_every_candidate(runs):
    name, out, _, _ = runs
    report = json.loads((out / "final" / "candidates.json").read_text())
    candidates = {c["name"]: c for c in report["candidates"]}
    assert [c["kind"] for c in candidates.values()].count("swa") >= 3 and "ema_0.5" in candidates
    if name == "vision":  # (the store on XLA: its families, built from the files its points wrote)
        assert {"lawa_last_1", "lawa_last_2", "posthoc_ema_0.07", "posthoc_ema_0.1", "bema"} <= set(candidates)
        assert (out / "snapshots" / "store.json").is_file()
    assert report["selection_split"] == "validation"
    best = min(candidates, key=lambda n: candidates[n]["metrics"]["validation"]["nll"])
    assert report["chosen"] == best
    results = json.loads((out / "final" / "results.json").read_text())
    assert results["swa"] == candidates[best]["metrics"]
    # The candidates really differ: later starts hold fewer updates and score otherwise.
    assert len({c["n_averaged"] for c in candidates.values()}) >= 3
    assert len({c["metrics"]["validation"]["nll"] for c in candidates.values()}) == len(candidates)


def test_resume_ends_bit_identical_to_the_uninterrupted_run(runs):
    _, full, _, resumed = runs
    assert_same_final_weights(full, resumed)
    final = [r for r in read_metrics(full / "metrics.jsonl") if r.get("final")]
    assert final == [r for r in read_metrics(resumed / "metrics.jsonl") if r.get("final")]


def test_the_exports_load_on_the_cpu_and_reproduce_the_logged_scores(runs):
    name, out, _, _ = runs
    logged = {(r["model"], r["split"]): r for r in read_metrics(out / "metrics.jsonl") if r.get("final")}
    for which in ("base", "swa"):
        if name == "vision":
            model = SWACNNForImageClassification.from_pretrained(out / "final" / which)
            data = load_vision_data(VisionDataArguments(dataset_name="digits", label_noise=0.3, max_train_samples=256,
                                                        validation_fraction=0.2))
            split, loader = "test", torch.utils.data.DataLoader(data.evals["test"], batch_size=64,
                                                                collate_fn=identity_collate)
            logits, labels = predict(model, loader, OneProcess)
        else:
            from transformers import pipeline

            classifier = pipeline("text-classification", model=str(out / "final" / which), device="cpu")
            assert classifier("a fine sentence")[0]["label"] in {"negative", "neutral", "positive"}
            split, (logits, labels) = "validation", text_logits(out / "final" / which)
        again = compute_metrics(load_metrics(["accuracy", "nll"]), logits, labels)
        assert again["accuracy"] == pytest.approx(logged[(which, split)]["accuracy"], abs=1e-9), which
        assert again["nll"] == pytest.approx(logged[(which, split)]["nll"], abs=1e-4), which
    base, swa = (load_file(out / "final" / which / "model.safetensors") for which in ("base", "swa"))
    assert all(value.dtype == torch.float32 for value in swa.values() if value.is_floating_point())
    assert any(not torch.equal(base[k], swa[k]) for k in base)


def test_xla_compiles_nothing_after_the_warm_up_and_never_waits_between_logging_steps(runs):
    name, out, _, _ = runs
    report = counters(out)
    # Training: no device-to-host copy between two logging reads, from the very first step.
    assert len(report["log_intervals"]) >= 8 and all(i["transfers"] == 0 for i in report["log_intervals"])
    assert all(epoch["transfers"] == 0 for epoch in report["epochs"])
    # The first epochs compile the step, the first update, evaluation and candidate snapshot (SWA starts after
    # epoch 1, a later candidate after epochs 2, 3 and 4). The last two run everything again (steps, averaging updates, a later
    # candidate's start, an evaluation of the base and the average with its BN pass, a checkpoint) and compile
    # nothing at all.
    epochs = report["epochs"]
    assert len(epochs) == 5 and epochs[0]["compiles"] > 0
    assert [epoch["all_phases"]["compiles"] for epoch in epochs[3:]] == [0, 0]
    occurrences = report["occurrences"]
    times = {phase: sum(entry["times"] for entry in entries) for phase, entries in occurrences.items()}
    assert times["averaging_updates"] >= 10 and times["evaluation"] >= 4 and times["checkpointing"] >= 4
    assert times["candidate_starts"] >= 2
    # Averaging updates never read the device; a BN pass reads its batch count once.
    assert all(entry["transfers"] == 0 for entry in occurrences["averaging_updates"])
    if name == "vision":  # (the text model has no BatchNorm: no pass)
        assert times["bn_recompute"] >= 4
        assert all(entry["transfers"] == 1 for entry in occurrences["bn_recompute"])


def text_logits(folder):
    """Logits of the exported model on the smoke config's validation rows, on the CPU, padded as in training."""
    from recipes.text.data import TextDataArguments, load_text_data
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    data = load_text_data(TextDataArguments(dataset_name="wordnet_sentiment", max_length=32, max_train_samples=128,
                                            max_eval_samples=64), tokenizer, static_shapes=True)
    loader = torch.utils.data.DataLoader(data.evals["validation"], batch_size=64, collate_fn=data.collate_fn)
    return predict(model, loader, OneProcess)
