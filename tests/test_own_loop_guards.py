"""The `SWA` object in a user's own loop, as users get it wrong: built before `prepare`, asked for the average
before the first update, a loader without a length, a plain `Accelerator()` under a 2-process launch, a launch
that started fewer processes than asked for, a shuffle a resume cannot replay. Each gives one line naming the
fix, or a defined, documented behaviour; and the plan line users see."""

import re

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, set_seed
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from swa_accel import SWA, ConfigError, SWAArguments
from tests.helpers.launch import CONFIGS, ROOT, launch
from tests.helpers.own_loop import (OWN_LOOP, assert_averages_its_snapshots_and_recomputes_bn,
                                     own_loop_args)



def fresh_accelerator(**kwargs) -> Accelerator:
    AcceleratorState._reset_state(True)  # a fresh accelerator per test, as in a new process
    GradientState._reset_state()
    set_seed(0)
    return Accelerator(cpu=True, **kwargs)


def parts(shuffle=False, dataset=None):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dataset = dataset if dataset is not None else TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    return model, optimizer, DataLoader(dataset, batch_size=8, shuffle=shuffle)


def train_steps(accelerator, model, optimizer, loader, swa, epochs=1):
    for _ in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
            swa.step()


def test_swa_built_before_prepare_is_refused_naming_the_fix():
    accelerator = fresh_accelerator()
    model, optimizer, loader = parts()
    with pytest.raises(ConfigError, match=r"^train_loader: a DataLoader that accelerator.prepare has not returned, .*"
                                          r"build SWA after `model, optimizer, train_loader = accelerator.prepare"):
        SWA(accelerator, model, optimizer, loader, SWAArguments(), num_epochs=2)
    prepared_model, prepared_loader = accelerator.prepare(model, loader)
    with pytest.raises(ConfigError, match=r"^optimizer: a SGD that accelerator.prepare has not returned"):
        SWA(accelerator, prepared_model, optimizer, prepared_loader, SWAArguments(), num_epochs=2)


def test_before_the_first_update_there_is_no_average_and_it_says_so():
    accelerator = fresh_accelerator()
    model, optimizer, loader = accelerator.prepare(*parts())
    swa = SWA(accelerator, model, optimizer, loader, SWAArguments(swa_start_epoch=1), num_epochs=3, verbose=False)
    train_steps(accelerator, model, optimizer, loader, swa)  # epoch 0: before the SWA start
    assert not swa.has_average and swa.export() is None
    with swa.average_in_model() as averaged:
        assert averaged is None  # documented: evaluate the training model until then
    train_steps(accelerator, model, optimizer, loader, swa, epochs=2)
    assert swa.has_average and swa.n_averaged == 2
    with swa.average_in_model() as averaged:
        assert isinstance(averaged, nn.Module)


class Stream(IterableDataset):
    """A dataset without a length, as streaming datasets are."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(64):
            yield torch.randn(4, generator=generator), torch.randint(0, 2, (), generator=generator)


def test_a_loader_without_a_length_needs_a_step_budget():
    accelerator = fresh_accelerator()
    model, optimizer, loader = accelerator.prepare(*parts(dataset=Stream()))
    with pytest.raises(ConfigError, match=r"^num_epochs: the train loader \(\w+\) has no length, so an epoch cannot "
                                          r"be counted; give the budget as max_steps=N"):
        SWA(accelerator, model, optimizer, loader, SWAArguments(), num_epochs=2)
    swa = SWA(accelerator, model, optimizer, loader, SWAArguments(swa_start_step=4, swa_update_every_steps=1),
              max_steps=8, verbose=False)
    train_steps(accelerator, model, optimizer, loader, swa)
    assert swa.steps_done == 8 and swa.n_averaged == 4  # after steps 5, 6, 7 and 8


@pytest.mark.parametrize(("option", "settings", "fix"), [
    ("swa_start_epoch", dict(swa_start_epoch=1, swa_update_every_steps=1), "swa_start_step or swa_start_fraction"),
    ("swa_update_every_steps", dict(swa_start_step=4), "averages at epoch ends; set swa_update_every_steps=N"),
    ("swa_anneal_steps", dict(swa_start_step=4, swa_update_every_steps=1, swa_lr=0.05), "anneals over one epoch"),
    ("swa_start_candidates", dict(swa_start_step=4, swa_update_every_steps=1, swa_start_candidates="every_epoch"),
     "fractions of the budget"),
    ("snapshot_every", dict(swa_start_step=4, swa_update_every_steps=1, snapshot_every="every_epoch"),
     "use every_N_steps"),
])
def test_a_loader_without_a_length_refuses_settings_counted_in_epochs(tmp_path, option, settings, fix):
    """Its one "epoch" is the whole budget: each would span the run (one average, one store point) without a word."""
    accelerator = fresh_accelerator()
    model, optimizer, loader = accelerator.prepare(*parts(dataset=Stream()))
    with pytest.raises(ConfigError, match=rf"^{option}: the train loader \(\w+\) has no length, so it has no epochs "
                                          rf"to count in; .*{fix}"):
        SWA(accelerator, model, optimizer, loader, SWAArguments(**settings), max_steps=8, store_dir=tmp_path)
    # The same in steps runs: points every 4 steps, averaging every step.
    swa = SWA(accelerator, model, optimizer, loader, SWAArguments(swa_start_step=4, swa_update_every_steps=1,
                                                                  swa_lr=0.05, swa_anneal_steps=0,
                                                                  snapshot_every="every_4_steps"),
              max_steps=8, store_dir=tmp_path / "store", verbose=False)
    assert swa.store_plan.cut_steps == (8,) and swa.plan.update_after_step(5)


def test_the_plan_and_its_warnings_are_printed_once_and_can_be_silenced(capsys):
    accelerator = fresh_accelerator()
    model, optimizer, loader = accelerator.prepare(*parts())
    SWA(accelerator, model, optimizer, loader, SWAArguments(swa_start_epoch=3, swa_lr=0.05), num_epochs=4)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "swa plan: 32 optimizer steps (4 epochs of 8); swa averaging from step 24 (epoch 3), at each epoch end: "
        "1 updates at swa_lr 0.05",
        "warning: the plan gives 1 averaging update(s): the average is the weights of a single step, not an "
        "average; start averaging earlier or set swa_update_every_steps"]
    SWA(accelerator, model, optimizer, loader, SWAArguments(swa_start_epoch=3), num_epochs=4, verbose=False)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("shuffle,seedable,warned", [(True, False, True), (True, True, False), (False, False, False)])
def test_a_shuffle_that_a_resume_cannot_replay_is_named(capsys, shuffle, seedable, warned):
    config = DataLoaderConfiguration(use_seedable_sampler=seedable)
    accelerator = fresh_accelerator(dataloader_config=config)
    model, optimizer, loader = accelerator.prepare(*parts(shuffle=shuffle))
    SWA(accelerator, model, optimizer, loader, SWAArguments(swa_start_epoch=1), num_epochs=4)
    out = capsys.readouterr().out
    assert ("warning: the train loader shuffles from a generator that accelerator.save_state does not save" in out) \
        == warned
    if warned:
        assert "use_seedable_sampler=True" in out and "set_epoch(epoch)" in out


def test_a_plain_accelerator_under_a_two_process_launch_is_refused():
    """On a machine without GPUs `Accelerator()` makes each launched process a run of its own."""
    result = launch(ROOT / "tests" / "workers" / "plain_accelerator_loop.py", [], num_processes=2, check=False,
                    env={"PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    assert re.search(r"^error: launch: the launcher started 2 processes but this Accelerator sees 1; each would "
                     r"train and average alone on all the data \(on a machine without GPUs build "
                     r"Accelerator\(cpu=True\)", result.stdout, re.M), result.stdout + result.stderr


def test_a_launch_that_started_fewer_processes_than_asked_is_named():
    """`accelerate launch --num_processes 2` with a one-process CPU config starts one process, silently."""
    result = launch(ROOT / "tests" / "workers" / "plain_accelerator_loop.py", ["cpu"],
                    launcher_args=("--num_processes", "2"), config_file=CONFIGS[1], env={"PYTHONPATH": str(ROOT)})
    assert result.stdout.splitlines()[0].startswith(
        "warning: the launch asked for 2 processes (--num_processes 2) but this run has 1; on a machine without GPUs")
    assert result.stdout.splitlines()[-1] == "built with 1 process(es)"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The own-loop example on 2 processes, straight through (PYTHONPATH as after `pip install -e .`)."""
    out = tmp_path_factory.mktemp("own_loop") / "whole"
    result = launch(OWN_LOOP, own_loop_args(out, 16), num_processes=2, env={"PYTHONPATH": str(ROOT)})
    return out, result


def test_the_own_loop_example_on_two_processes_averages_its_snapshots_and_recomputes_bn(two_process_run):
    out, result = two_process_run
    assert_averages_its_snapshots_and_recomputes_bn(out, result.stdout, 16)


def test_a_two_process_shuffled_loop_resumes_bit_identically(two_process_run, tmp_path):
    """own_loop.py: seedable shuffle and set_epoch, save_state each epoch; stopped after epoch 4 of 5 and
    resumed, its average and BN statistics equal the uninterrupted run's bit for bit."""
    whole, split, env = two_process_run[0], tmp_path / "split", {"PYTHONPATH": str(ROOT)}
    launch(OWN_LOOP, own_loop_args(split, 16, "--stop_after_epoch", "4"), num_processes=2, env=env)
    assert not (split / "swa.safetensors").exists()  # it stopped before the end
    resumed = launch(OWN_LOOP, own_loop_args(split, 16, "--resume"), num_processes=2, env=env)
    assert "3 snapshots averaged" in resumed.stdout
    ours, theirs = (load_file(folder / "swa.safetensors") for folder in (whole, split))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)