"""SWA in `transformers.Trainer` (swa_accel.hf_trainer), end to end through recipes/hf_trainer.py,
tests/workers/hf_trainer_steps.py and the real `accelerate launch`, with 1 and 2 CPU processes: a BatchNorm ResNet,
the tiny BERT of the text tests and a tiny Llama in TRL's SFTTrainer; the plan in the Trainer's own steps."""

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


RESUME_ARGS = ["--swa_update_every_steps", "5", "--save_steps", "50"]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """The image task run to the end, a checkpoint every 50 steps."""
    whole = tmp_path_factory.mktemp("whole") / "run"
    run(whole, *RESUME_ARGS)
    return whole


def test_resume_through_trainer_restores_the_average_bit_identically(whole_run, tmp_path):
    resumed = tmp_path / "resumed"
    # A run stopped after step 150 (averaging from step 114, every 5 steps: 7 updates): its checkpoint, resumed.
    resumed.mkdir()
    shutil.copytree(whole_run / "checkpoint-150", resumed / "checkpoint-150")
    state = torch.load(resumed / "checkpoint-150" / "swa_state.pt", weights_only=True)
    assert state["swa"]["averager"]["n_averaged"] == 7 and state["swa"]["steps_done"] == 150
    run(resumed, *RESUME_ARGS, "--resume_from_checkpoint", "latest")
    ours, theirs = (load_file(p / "final" / "model.safetensors") for p in (resumed, whole_run))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_checkpoint_without_swa_state_is_refused_in_one_line(whole_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(whole_run / "checkpoint-50", out / "checkpoint-50")
    (out / "checkpoint-50" / "swa_state.pt").unlink()
    result = launch(SCRIPT, ["--output_dir", str(out), *RESUME_ARGS, "--resume_from_checkpoint",
                             str(out / "checkpoint-50")], check=False, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    assert "resume_from_checkpoint: " in result.stderr and "holds no swa_state.pt" in result.stderr
    assert not (out / "final").exists() and not (out / "checkpoint-100").exists()  # (refused before any step)


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


def test_add_swa_refuses_what_it_would_silently_drop(tmp_path):
    from swa_accel import ConfigError, SWAArguments
    from swa_accel.hf_trainer import add_swa

    with pytest.raises(ConfigError, match="^swa_method: 'none' averages nothing"):
        add_swa(None, SWAArguments(swa_method="none"))
    # Candidates are chosen on the Trainer's eval_dataset: without one, the run stops before its first step.
    trainer = digits_trainer(tmp_path, 64, num_train_epochs=2)
    trainer.eval_dataset = None
    add_swa(trainer, SWAArguments(swa_start_epoch=0, swa_start_candidates="every_epoch"))
    with pytest.raises(ConfigError, match="^swa_start_candidates: add_swa chooses among candidates .*; pass "
                                          "eval_dataset$"):
        trainer.train()
    assert trainer.state.global_step == 0


# ----- the Trainer's own steps: gradient accumulation on 2 processes ------------------------------------------------
# tests/workers/hf_trainer_steps.py (see its docstring): 29 micro-batches per process and epoch, accumulation 2, so
# the Trainer's epoch is 15 optimizer steps (the last of one micro-batch) and 4 epochs are 60 steps; the SWA start
# after epoch 1 is step 15, the anneal one epoch (15 steps) from 0.05 to swa_lr 0.02.

STEPS_PER_EPOCH, TOTAL, START = 15, 60, 15


@pytest.fixture(scope="module")
def accumulation_runs(tmp_path_factory):
    """The worker's four runs in one 2-process launch: {run name: what it recorded}, and the output folder."""
    out = tmp_path_factory.mktemp("accumulation")
    result = launch(ROOT / "tests" / "workers" / "hf_trainer_steps.py", [str(out)], num_processes=2,
                    env={"PYTHONPATH": str(ROOT)})
    runs = {name: torch.load(out / f"{name}.pt", weights_only=True)
            for name in ("per_step", "epoch_ends", "resumed", "max_steps", "candidates", "candidates_resumed")}
    return runs, out, result.stdout


def assert_mean_of(run: dict, steps) -> None:
    """The final weights (the installed average) are the float64 mean of the weights after `steps`."""
    steps = list(steps)
    for name, value in run["final"].items():
        mean = torch.stack([run["weights"][step][name] for step in steps]).mean(0)
        torch.testing.assert_close(value, mean, atol=1e-5, rtol=0)


def test_accumulation_on_two_processes_averages_every_step_of_the_documented_window(accumulation_runs):
    from swa_accel.swa_lr import swa_phase_lr

    run = accumulation_runs[0]["per_step"]
    assert run["processes"] == 2
    assert run["plan"] == {"steps_per_epoch": STEPS_PER_EPOCH, "total_steps": TOTAL, "swa_start_step": START,
                           "anneal_steps": STEPS_PER_EPOCH}
    assert sorted(run["weights"]) == list(range(1, TOTAL + 1))  # one record per optimizer step, not micro-batch
    assert run["n_averaged"] == TOTAL - START == 45
    assert_mean_of(run, range(START + 1, TOTAL + 1))
    # The rate of every optimizer step: the constant 0.05, then SWALR's cos anneal to 0.02 over one epoch.
    expected = {step: 0.05 if step - 1 < START else swa_phase_lr(step - 1, START, STEPS_PER_EPOCH, "cos", 0.05, 0.02)
                for step in range(1, TOTAL + 1)}
    assert run["rates"].keys() == expected.keys()
    for step, rate in run["rates"].items():
        assert rate == pytest.approx(expected[step], abs=1e-12), step
    assert expected[START + 8] < 0.05 and expected[START + STEPS_PER_EPOCH] == pytest.approx(0.02)
    # The log (every 5 steps) shows the rate the step used, not the constant scheduler's.
    assert [step for step, _ in run["logged"]] == list(range(5, TOTAL + 1, 5))
    for step, rate in run["logged"]:
        assert rate == pytest.approx(expected[step], abs=1e-12), step


def test_epoch_cadence_with_accumulation_and_a_checkpoint_on_an_epoch_end_resumed_bit_identically(
        accumulation_runs):
    runs, out, stdout = accumulation_runs
    whole, resumed = runs["epoch_ends"], runs["resumed"]
    assert whole["n_averaged"] == resumed["n_averaged"] == 3  # the ends of epochs 2, 3 and 4
    assert_mean_of(whole, (30, 45, 60))
    # A checkpoint and an evaluation on an epoch's last step include that step's epoch-end update.
    assert whole["evaluations"] == [(15, 0), (30, 1), (45, 2), (60, 3)]
    saved = torch.load(out / "epoch_ends" / "checkpoint-30" / "swa_state.pt", weights_only=True)["swa"]
    assert saved["steps_done"] == 30 and saved["averager"]["n_averaged"] == 1
    # Resumed from checkpoint-30 (through the with_swa class): the rest of the run, and the same final weights.
    assert sorted(resumed["weights"]) == list(range(31, TOTAL + 1))
    assert resumed["evaluations"] == [(45, 2), (60, 3)]
    assert all(torch.equal(resumed["final"][k], whole["final"][k]) for k in whole["final"])
    # metric_for_best_model compares both kinds of evaluation: the run says so, and what the final weights are.
    line = ("swa: evaluations from optimizer step 30 on score the average, earlier ones the base model; "
            "best_metric (loss) compares both kinds; the final weights are the average")
    assert stdout.count(line) == 2  # (the whole run and the resumed one, on the main process only)


def test_a_max_steps_budget_ends_where_the_trainer_ends_and_a_cut_epoch_has_no_end(accumulation_runs):
    run = accumulation_runs[0]["max_steps"]
    assert run["plan"]["total_steps"] == 50 and run["plan"]["swa_start_step"] == START
    assert max(run["weights"]) == 50
    assert run["n_averaged"] == 2  # the ends of epochs 2 and 3; epoch 4 is cut after 5 steps
    assert_mean_of(run, (30, 45))


# ----- the plan from the Trainer's own numbers (one process, no training) ------------------------------------------

def digits_trainer(tmp_path, samples: int, **training):
    from transformers import Trainer, TrainingArguments

    from recipes.hf_trainer import DigitsDataset, image_task

    arguments = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=32, use_cpu=True,
                                  report_to="none", **training)
    return Trainer(model=image_task()[0], args=arguments, eval_dataset=DigitsDataset("validation"),
                   train_dataset=torch.utils.data.Subset(DigitsDataset("train"), range(samples)))


def plan_of(trainer, **swa):
    from swa_accel import SWAArguments
    from swa_accel.hf_trainer import trainer_plan

    return trainer_plan(trainer, SWAArguments(**swa), trainer.get_train_dataloader())


def test_the_plan_counts_the_trainers_optimizer_steps_and_epochs(tmp_path):
    from swa_accel import ConfigError

    # The README's example: 6 epochs of 38 micro-batches, accumulation 2, swa_start_epoch=3.
    plan = plan_of(digits_trainer(tmp_path, 1200, num_train_epochs=6, gradient_accumulation_steps=2),
                   swa_start_epoch=3, swa_lr="0.02")
    assert (plan.steps_per_epoch, plan.total_steps, plan.num_epochs) == (19, 114, 6)
    assert (plan.swa_start_step, plan.anneal_steps) == (57, 19)
    # 29 micro-batches: the epoch's last step takes the remaining one.
    plan = plan_of(digits_trainer(tmp_path, 900, num_train_epochs=4, gradient_accumulation_steps=2),
                   swa_start_epoch=1)
    assert (plan.steps_per_epoch, plan.total_steps, plan.swa_start_step) == (15, 60, 15)
    # Fractional epochs and max_steps: the Trainer's budget (ceil(2.5 * 15) steps; max_steps wins over epochs).
    plan = plan_of(digits_trainer(tmp_path, 900, num_train_epochs=2.5, gradient_accumulation_steps=2),
                   swa_start_fraction=0.5)
    assert (plan.total_steps, plan.num_epochs, plan.swa_start_step) == (38, 3, 19)
    budget = digits_trainer(tmp_path, 900, num_train_epochs=9, max_steps=50, gradient_accumulation_steps=2)
    plan = plan_of(budget, swa_start_epoch=2, swa_update_every_steps=5)
    assert (plan.total_steps, plan.num_epochs, plan.swa_start_step, plan.update_every_steps) == (50, 4, 30, 5)
    with pytest.raises(ConfigError, match=r"^swa_start_epoch: averaging would start at optimizer step 60, but "
                                          r"training ends after 50 steps \(4 epochs of 15\)$"):
        plan_of(budget, swa_start_epoch=4)


def test_load_best_model_at_end_is_refused_in_one_line(tmp_path):
    from transformers import Trainer

    from swa_accel import ConfigError, SWAArguments
    from swa_accel.hf_trainer import add_swa, with_swa

    best = dict(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="epoch")
    trainer = digits_trainer(tmp_path, 64, **best)
    pattern = (r"^load_best_model_at_end: with add_swa the final weights are the average, .*; "
               r"set load_best_model_at_end=False")
    with pytest.raises(ConfigError, match=pattern) as refused:
        add_swa(trainer, SWAArguments(swa_start_epoch=1))
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match=pattern):
        with_swa(Trainer)(model=trainer.model, args=trainer.args, eval_dataset=trainer.eval_dataset,
                          swa_args=SWAArguments(swa_start_epoch=1))
    # Set after add_swa, it is refused when training starts, before any step.
    trainer = digits_trainer(tmp_path, 64, eval_strategy="epoch", save_strategy="epoch")
    add_swa(trainer, SWAArguments(swa_start_epoch=1))
    trainer.args.load_best_model_at_end = True
    with pytest.raises(ConfigError, match=pattern):
        trainer.train()
    assert trainer.state.global_step == 0


def test_trl_sft_trainer_with_add_swa_averages_a_tiny_llama(tmp_path):
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from swa_accel import SWAArguments
    from swa_accel.hf_trainer import add_swa
    from swa_accel.swa_lr import swa_phase_lr
    from tests.helpers.tiny_lm import sentences, tiny_llama, tiny_tokenizer

    set_seed(0)
    tokenizer = tiny_tokenizer()
    config = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                       num_train_epochs=3, max_length=16, learning_rate=0.05, lr_scheduler_type="constant",
                       optim="sgd", use_cpu=True, bf16=False, report_to="none", logging_steps=1,
                       save_strategy="no", seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=tiny_llama(len(tokenizer)), args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"text": sentences(64)}))
    swa = add_swa(trainer, SWAArguments(swa_start_epoch=1, swa_update_every_steps=1, swa_lr="0.02"))
    weights = step_weights()
    trainer.add_callback(weights)
    trainer.train()

    assert isinstance(trainer, SFTTrainer)
    # 8 micro-batches of 8 per epoch, accumulation 2: 4 optimizer steps per epoch, 12 in all, averaged after step 4.
    assert (swa.swa.plan.steps_per_epoch, swa.swa.plan.total_steps, swa.swa.plan.swa_start_step) == (4, 12, 4)
    assert swa.swa.averager.n_averaged == 8
    final = dict(trainer.model.named_parameters())
    for name, value in final.items():
        mean = torch.stack([weights.after[step][name] for step in range(5, 13)]).mean(0)
        torch.testing.assert_close(value.detach().double(), mean, atol=1e-5, rtol=0)
    logged = {row["step"]: row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row}
    assert logged[4] == pytest.approx(0.05)
    for step in range(5, 13):
        assert logged[step] == pytest.approx(swa_phase_lr(step - 1, 4, 4, "cos", 0.05, 0.02), abs=1e-12), step


# ----- candidates and the snapshot store through add_swa (one process, in this process) -----------------------------

def step_weights():
    """A callback recording the parameters (float64) after every optimizer step, in `.after[global_step]`."""
    from transformers import TrainerCallback

    class StepWeights(TrainerCallback):
        def __init__(self):
            self.after = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.after[state.global_step] = {k: v.detach().double().clone() for k, v in model.named_parameters()}

    return StepWeights()


def assert_installed(trainer, tensors) -> None:
    for name, value in trainer.model.named_parameters():
        torch.testing.assert_close(value.detach(), tensors[name].to(value.dtype), rtol=0, atol=0)


def test_add_swa_scores_every_candidate_and_store_family_on_the_eval_dataset_and_installs_the_best(tmp_path):
    from transformers import set_seed

    from swa_accel import SWAArguments
    from swa_accel.hf_trainer import add_swa

    set_seed(0)
    # 320 samples of 32: 10 steps an epoch, 4 epochs; averaging every epoch end from epoch 1.
    trainer = digits_trainer(tmp_path, 320, num_train_epochs=4, learning_rate=0.05, save_strategy="no",
                             metric_for_best_model="loss")
    callback = add_swa(trainer, SWAArguments(
        swa_start_epoch=1, swa_lr="0.02", swa_start_candidates="every_epoch", ema_decays="0.5",
        snapshot_every="every_epoch", lawa_ks="1,2", posthoc_ema_widths="0.1", bema=True, soup=True))
    weights = step_weights()
    trainer.add_callback(weights)
    trainer.train()

    choice = callback.choice
    names = [c.name for c in choice.candidates]
    assert names == ["swa_from_epoch_1", "swa_from_epoch_2", "swa_from_epoch_3", "ema_0.5", "lawa_last_1",
                     "lawa_last_2", "posthoc_ema_0.1", "bema", "soup"]
    losses = {c.name: c.metrics["validation"]["eval_loss"] for c in choice.candidates}
    assert choice.chosen == min(losses, key=losses.get) and choice.selection_metric == "eval_loss"
    # The windows are what they say: the mean of the epoch-end weights from their start.
    swa = callback.swa
    for name, first in (("swa_from_epoch_1", 2), ("swa_from_epoch_3", 4), ("lawa_last_2", 3)):
        built = swa.averager.candidate_tensors(name)
        for key, value in built.items():
            if key in weights.after[40]:
                mean = torch.stack([weights.after[10 * e][key] for e in range(first, 5)]).mean(0)
                torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7)
    # The chosen candidate is the model's now, and the Trainer's evaluate() reproduces its score.
    assert callback.installed
    assert_installed(trainer, swa.averager.candidate_tensors(choice.chosen))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(losses[choice.chosen], rel=1e-6)
    record = json.loads((tmp_path / "swa_candidates.json").read_text())
    assert record["chosen"] == choice.chosen and [c["name"] for c in record["candidates"]] == names
    assert [p["step"] for p in json.loads((tmp_path / "snapshots" / "store.json").read_text())["points"]] == [
        20, 30, 40]


def test_add_swa_on_a_run_without_swa_keeps_the_store_and_chooses_after_training(tmp_path):
    from transformers import set_seed

    from swa_accel import SWAArguments
    from swa_accel.hf_trainer import add_swa

    set_seed(0)
    trainer = digits_trainer(tmp_path, 320, num_train_epochs=3, learning_rate=0.05, save_strategy="no",
                             lr_scheduler_type="constant")
    callback = add_swa(trainer, SWAArguments(swa_method="none", swa_lr="0.5", snapshot_every="every_epoch",
                                             lawa_ks="1", posthoc_ema_widths="0.1"))
    weights = step_weights()
    trainer.add_callback(weights)
    trainer.train()
    # Trained as without SWA: the Trainer's own rate throughout, and its last weights stay the model's.
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [0.05] * len(trainer.optimizer.param_groups)
    assert not callback.installed and callback.choice is None
    assert_installed(trainer, {k: v.float() for k, v in weights.after[30].items()})

    choice = callback.choose_and_install()
    assert [c.name for c in choice.candidates] == ["swa_from_epoch_0", "lawa_last_1", "posthoc_ema_0.1"]
    assert choice.candidates[0].n_averaged == 3  # every epoch end of the run
    mean = {k: torch.stack([weights.after[s][k] for s in (10, 20, 30)]).mean(0) for k in weights.after[30]}
    for name, value in callback.swa.averager.candidate_tensors("swa_from_epoch_0").items():
        if name in mean:
            torch.testing.assert_close(value.double(), mean[name], rtol=1e-6, atol=1e-7)
    assert_installed(trainer, callback.swa.averager.candidate_tensors(choice.chosen))


def test_candidates_and_the_store_on_two_processes_with_accumulation_resume_to_the_same_choice(accumulation_runs):
    runs, out, _ = accumulation_runs
    whole, resumed = runs["candidates"], runs["candidates_resumed"]
    assert whole["processes"] == 2
    report = whole["choice"]
    names = [c["name"] for c in report["candidates"]]
    assert names == ["swa_from_epoch_1", "swa_from_epoch_2", "swa_from_epoch_3", "lawa_last_1", "posthoc_ema_0.1",
                     "bema"]
    losses = {c["name"]: c["metrics"]["validation"]["eval_loss"] for c in report["candidates"]}
    assert report["chosen"] == min(losses, key=losses.get)
    # Each later start is the mean of the weights at the epoch ends after it (the Trainer's epochs of 15 steps).
    for epoch in (1, 2, 3):
        window = whole["windows"][f"swa_from_epoch_{epoch}"]
        for key, value in window.items():
            if key in whole["weights"][60]:
                mean = torch.stack([whole["weights"][15 * e][key] for e in range(epoch + 1, 5)]).mean(0)
                torch.testing.assert_close(value, mean, rtol=1e-6, atol=1e-7)
    # Resumed from checkpoint-30 in the run's folder: the same candidates, scores and choice, the same weights.
    again = resumed["choice"]
    assert again["chosen"] == report["chosen"]
    assert [c["metrics"]["validation"]["eval_loss"] for c in again["candidates"]] == list(losses.values())
    assert all(torch.equal(resumed["final"][k], whole["final"][k]) for k in whole["final"])
    assert json.loads((out / "candidates" / "swa_candidates.json").read_text())["chosen"] == report["chosen"]
