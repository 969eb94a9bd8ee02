"""The default job (`./run.sh`) end to end: its SWA model beats its last iterate on the clean test split."""

import ast
import json
import os
import re
import subprocess
import sys

from swa_accel.runner.outputs import read_metrics
from tests.helpers.launch import ROOT, launch

SCRIPT = ROOT / "recipes" / "vision" / "train.py"
DEFAULT = ROOT / "recipes" / "vision" / "configs" / "digits_small_cnn.yaml"


def test_default_job_swa_beats_the_last_iterate(tmp_path):
    # The default config as run.sh runs it, except for checkpoints, which this test does not need.
    result = launch(SCRIPT, ["--config", str(DEFAULT), "--output_dir", str(tmp_path), "--checkpointing_steps", "None"],
                    timeout=900, real_launcher=True)
    final = {r["model"]: r for r in read_metrics(tmp_path / "metrics.jsonl")
             if r.get("final") and r["split"] == "test"}
    assert final["swa"]["n_averaged"] == 30  # one average per epoch from epoch 10 of 40
    # One run, many averages: every second epoch from 10 to 38 is a candidate start, chosen on validation NLL.
    report = json.loads((tmp_path / "final" / "candidates.json").read_text())
    # The snapshot store's families follow: LAWA, post-hoc EMA at 5 widths, BEMA, then the greedy soup of them all.
    widths = ("0.02", "0.05", "0.1", "0.15", "0.2")
    assert [c["name"] for c in report["candidates"]] == [f"swa_from_epoch_{e}" for e in range(10, 40, 2)] + [
        "lawa_last_1", "lawa_last_3", "lawa_last_5", *(f"posthoc_ema_{w}" for w in widths), "bema", "soup"]
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    assert chosen["metrics"]["validation"]["nll"] == min(c["metrics"]["validation"]["nll"]
                                                         for c in report["candidates"])
    assert final["swa"]["nll"] == chosen["metrics"]["test"]["nll"]
    # With 30% label noise the last iterate at a high constant LR is erratic; the average is not.
    assert final["swa"]["accuracy"] > final["base"]["accuracy"] + 0.03
    assert final["swa"]["accuracy"] > 0.9
    assert final["swa"]["nll"] < final["base"]["nll"]

    # The README's pipeline example, run as it stands (on this run's folder) from a folder outside the repository,
    # with nothing of it importable: it prints the label the recipe's own model gives that digit.
    readme = (ROOT / "README.md").read_text()
    # The plan line the README shows is the one the run prints (the figures after it are one machine's).
    plan = next(line for line in readme.splitlines() if line.startswith("plan: "))
    assert plan in result.stdout.splitlines()
    example = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
                   if 'pipeline("image-classification"' in block)
    assert '"outputs/digits_small_cnn/final/swa"' in example  # the default config's output_dir
    example = example.replace('"outputs/digits_small_cnn/final/swa"', repr(str(tmp_path / "final" / "swa")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(elsewhere / "modules"))
    result = subprocess.run([sys.executable, "-c", example], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert printed[0]["label"] == recipe_label_of_the_last_digit(tmp_path / "final" / "swa")


def recipe_label_of_the_last_digit(folder) -> str:
    """The label the exported model gives scikit-learn's last digit, normalised as the recipe normalises its data
    (the default config's training split's mean and std), without any image processor."""
    import dataclasses

    import torch
    import yaml
    from sklearn.datasets import load_digits
    from transformers import AutoModelForImageClassification

    import recipes.vision.hf_models  # noqa: F401  (registers the export's classes with the Auto classes)
    from recipes.vision.data import VisionDataArguments, load_vision_data

    config = yaml.safe_load(DEFAULT.read_text())
    data = load_vision_data(VisionDataArguments(**{f.name: config[f.name] for f in dataclasses.fields(
        VisionDataArguments) if f.name in config}))
    pixels = (torch.tensor(load_digits().images[-1], dtype=torch.float32) / 16 - data.mean[0]) / data.std[0]
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(pixel_values=pixels[None, None]).logits
    return model.config.id2label[int(logits.argmax())]
