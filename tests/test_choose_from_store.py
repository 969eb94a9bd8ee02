"""`--choose_from_store true` (issue 23): a finished run's snapshot store gives other later starts and other families
after the fact, scored on validation and exported into output_dir/chosen, with nothing of the run rewritten."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.helpers.launch import ROOT, launch

SCRIPT = ROOT / "recipes" / "vision" / "train.py"
SMOKE = ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"


def args(out, *extra):
    # digits, 5 epochs of 8 steps, averaging at each epoch end from epoch 1: 4 updates; a store point every epoch
    return ["--config", str(SMOKE), "--output_dir", str(out), "--num_train_epochs", "5", "--validation_fraction",
            "0.2", "--snapshot_every", "every_epoch", "--bema", "true", "--plot", "false", *extra]


def by_name(report: dict) -> dict:
    return {c["name"]: c for c in report["candidates"]}


def assert_same_scores(a: dict, b: dict) -> None:
    assert a["metrics"].keys() == b["metrics"].keys()
    for split in a["metrics"]:
        assert a["metrics"][split] == pytest.approx(b["metrics"][split], rel=1e-6), split


def test_a_finished_runs_store_builds_other_starts_and_families_and_changes_nothing_of_the_run(tmp_path):
    out = tmp_path / "run"
    launch(SCRIPT, args(out, "--lawa_ks", "1,2"))
    run_report = json.loads((out / "final" / "candidates.json").read_text())
    untouched = {p: p.read_bytes() for p in [out / "metrics.jsonl", out / "config.yaml",
                                             out / "final" / "candidates.json", out / "final" / "swa" /
                                             "model.safetensors", *(out / "snapshots").iterdir()]}
    # Points at epochs 2 to 5; the two kept checkpoints (epochs 4 and 5) name the weights of points 1, 2 and 2, 3:
    # a resume from either finds them, so these three stay after the run (and the choice below deletes nothing).
    assert sorted(p.name for p in (out / "snapshots").glob("weights-*")) == [
        f"weights-{i:05d}.rank0.safetensors" for i in (1, 2, 3)]
    # After the fact: every later start (the run kept none), LAWA over 2 points only, another post-hoc EMA width.
    result = launch(SCRIPT, args(out, "--lawa_ks", "2", "--swa_start_candidates", "every_epoch",
                                 "--posthoc_ema_widths", "0.07", "--soup", "true", "--choose_from_store", "true"))
    assert f"chosen from the store: {out / 'chosen' / 'swa'}" in result.stdout
    chosen = json.loads((out / "chosen" / "candidates.json").read_text())
    assert [c["name"] for c in chosen["candidates"]] == [
        "swa_from_epoch_1", "swa_from_epoch_2", "swa_from_epoch_3", "swa_from_epoch_4", "lawa_last_2",
        "posthoc_ema_0.07", "bema", "soup"]
    new, old = by_name(chosen), by_name(run_report)
    assert [new[f"swa_from_epoch_{e}"]["n_averaged"] for e in range(1, 5)] == [4, 3, 2, 1]
    # What both scored is the same average with the same BN pass: the same scores.
    for name in ("swa_from_epoch_1", "bema"):
        assert_same_scores(new[name], old[name])
    # The window of the last epoch's one update is the last point's weights: LAWA over one point, in the run.
    assert_same_scores(new["swa_from_epoch_4"], old["lawa_last_1"])
    # ... and LAWA over the last two points (epoch-end updates) is the window from epoch 3.
    assert_same_scores(new["lawa_last_2"], new["swa_from_epoch_3"])
    best = min(chosen["candidates"], key=lambda c: c["metrics"]["validation"]["nll"])
    assert chosen["chosen"] == best["name"]
    assert load_file(out / "chosen" / "swa" / "model.safetensors").keys() == \
        load_file(out / "final" / "swa" / "model.safetensors").keys()
    assert all(path.read_bytes() == content for path, content in untouched.items())
    assert set((out / "snapshots").iterdir()) <= set(untouched)

    # Choosing with other tracked settings than the run kept, or with no store, is one line naming the option.
    refused = refusals([args(out, "--bema", "false", "--choose_from_store", "true"),
                        args(out, "--lawa_ks", "1,3", "--choose_from_store", "true"),
                        args(out, "--snapshot_every", "None", "--bema", "false", "--choose_from_store", "true")])
    assert [code for code, _ in refused] == [1, 1, 1]
    assert refused[0][1] == "error: bema: the checkpoint's snapshot store was kept with bema true (this config: " \
                            "false); pass the run's store settings"
    assert refused[1][1].startswith("error: lawa_ks: the checkpoint's snapshot store was kept with the weights of "
                                    "its last 2 points, so lawa_ks up to 2 (this config: lawa_ks up to 3)")
    assert refused[2][1].startswith("error: choose_from_store: this config keeps no snapshot store")
    assert all(path.read_bytes() == content for path, content in untouched.items())


def refusals(argvs: list[list[str]]) -> list[tuple[int, str]]:
    """Each refused command line's exit status and last stderr line, all in one process (paying the imports once)."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "refusals.py"), json.dumps(argvs)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return [(r["code"], r["last"]) for r in map(json.loads, result.stdout.splitlines())]


def test_choosing_from_a_run_without_checkpoints_or_store_is_one_line(tmp_path):
    result = launch(SCRIPT, args(tmp_path / "none", "--choose_from_store", "true"), check=False)
    assert result.returncode == 1
    assert "error: choose_from_store: no checkpoint in" in result.stderr


def test_a_run_without_swa_keeps_a_store_and_its_averages_are_chosen_after_the_fact(tmp_path):
    out, plain = tmp_path / "run", ["--swa_method", "none", "--lawa_ks", "1,2", "--posthoc_ema_widths", "0.1"]
    launch(SCRIPT, args(out, *plain))
    # The run itself trains, evaluates and exports as without SWA ...
    assert (out / "final" / "base" / "model.safetensors").is_file() and not (out / "final" / "swa").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {row["model"] for row in rows if "model" in row} == {"base"}
    # ... and keeps the store from its first epoch on.
    index = json.loads((out / "snapshots" / "store.json").read_text())
    steps = [point["step"] for point in index["points"]]
    assert len(steps) == 5 and steps == [steps[0] * e for e in range(1, 6)]

    result = launch(SCRIPT, args(out, *plain, "--choose_from_store", "true"))
    assert f"chosen from the store: {out / 'chosen' / 'swa'}" in result.stdout
    chosen = json.loads((out / "chosen" / "candidates.json").read_text())
    names = {c["name"]: c for c in chosen["candidates"]}
    assert list(names) == ["swa_from_epoch_0", "lawa_last_1", "lawa_last_2", "posthoc_ema_0.1", "bema"]
    assert names["swa_from_epoch_0"]["n_averaged"] == 5  # the whole run's epoch ends
    best = min(chosen["candidates"], key=lambda c: c["metrics"]["validation"]["nll"])
    assert chosen["chosen"] == best["name"]
    assert (out / "chosen" / "swa" / "model.safetensors").is_file()
