"""The SWA controller in a plain accelerate loop, in this process: real optimizer steps only, both cadences, the
SWA phase's LR on the user's optimizer, the averaged model, and resume through accelerate's own checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from swa_accel import SWA, ConfigError, SWAArguments


def setup(accumulation=1, **swa_overrides):
    AcceleratorState._reset_state(True)  # a fresh accelerator per run, as in a new process
    GradientState._reset_state()
    set_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    loader = DataLoader(data, batch_size=8, shuffle=True)  # 8 micro-batches per epoch
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    args = SWAArguments(**{"swa_start_epoch": 2, "swa_lr": 0.02, "swa_anneal_steps": 0, **swa_overrides})
    swa = SWA(accelerator, model, optimizer, loader, args, num_epochs=4)
    return accelerator, model, optimizer, loader, swa


def train(accelerator, model, optimizer, loader, swa, epochs, snapshots=None, rates=None):
    for _ in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), y))
                optimizer.step()
                if rates is not None and accelerator.sync_gradients:
                    rates.append(optimizer.param_groups[0]["lr"])
                optimizer.zero_grad()
            before = swa.n_averaged
            swa.step()
            if snapshots is not None and swa.n_averaged > before:
                snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})


@pytest.mark.parametrize("accumulation,steps_per_epoch", [(1, 8), (4, 2)])
def test_epoch_end_averages_count_real_optimizer_steps_and_match_the_mean(accumulation, steps_per_epoch):
    accelerator, model, optimizer, loader, swa = setup(accumulation)
    snapshots, rates = [], []
    train(accelerator, model, optimizer, loader, swa, 4, snapshots, rates)
    assert swa.plan.steps_per_epoch == steps_per_epoch and swa.steps_done == 4 * steps_per_epoch
    assert swa.n_averaged == len(snapshots) == 2  # the ends of epochs 3 and 4
    # The user's optimizer ran at its own 0.1 before the SWA start and at swa_lr after it.
    start = 2 * steps_per_epoch
    assert rates[:start] == pytest.approx([0.1] * start) and rates[start:] == pytest.approx([0.02] * start)
    with swa.average_in_model(full_bn_pass=True) as averaged:
        for name, value in averaged.named_parameters():
            torch.testing.assert_close(value, torch.stack([s[name] for s in snapshots]).mean(0))
        bn = averaged[1]
        assert int(bn.num_batches_tracked) == 8 and bn.running_var.min() > 0  # a pass over the 8 batches
    assert not torch.equal(model[1].running_mean, bn.running_mean)  # the training model keeps its own


def test_step_cadence_and_the_average_swapped_into_the_training_model():
    accelerator, model, optimizer, loader, swa = setup(swa_update_every_steps=3)
    snapshots = []
    train(accelerator, model, optimizer, loader, swa, 4, snapshots)
    assert swa.n_averaged == 5  # steps 19, 22, 25, 28, 31 after the start at step 16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with swa.average_in_model(in_training_model=True) as inside:
        assert inside is model
        mean = torch.stack([s["0.weight"] for s in snapshots]).mean(0)
        torch.testing.assert_close(model[0].weight.detach(), mean)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_through_accelerate_checkpoints_restores_the_average_and_the_lr_phase(tmp_path):
    """Stopped after epoch 3 and resumed from accelerate's own checkpoint (the controller registered itself), the
    run ends with the uninterrupted run's average, bit for bit."""
    whole = setup()
    train(*whole, 4)
    whole_average = {k: v.clone() for k, v in whole[4].averager.averaged.items()}
    first = setup()
    train(*first, 3)
    first[0].save_state(str(tmp_path / "ckpt"))
    resumed = setup()
    resumed[2].param_groups[0]["lr"] = 0.1  # (as a fresh optimizer would hold; the checkpoint's state wins)
    resumed[0].load_state(str(tmp_path / "ckpt"))
    assert resumed[4].steps_done == 24 and resumed[4].n_averaged == 1
    train(*resumed, 1)
    assert resumed[4].n_averaged == 2 and resumed[2].param_groups[0]["lr"] == pytest.approx(0.02)
    assert all(torch.equal(v, whole_average[k]) for k, v in resumed[4].averager.averaged.items())


def test_misuse_is_refused_in_one_line():
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    with pytest.raises(ConfigError, match="^num_epochs: give the training budget"):
        SWA(accelerator, model, optimizer, loader, SWAArguments())
    with pytest.raises(ConfigError, match="^swa_lr: 2 values for an optimizer with 1 param groups"):
        SWA(accelerator, model, optimizer, loader, SWAArguments(swa_lr="0.1,0.2"), num_epochs=2)
    with pytest.raises(ConfigError, match="^swa_method: 'none' averages nothing"):
        SWA(accelerator, model, optimizer, loader, SWAArguments(swa_method="none"), num_epochs=2)


def test_phases_after_the_loop_are_kept_apart_from_the_loops_own():
    from swa_accel.runner.phases import PhaseClock

    clock = PhaseClock(xla=False)
    with clock.timed("evaluation"):
        pass
    clock.close_loop(1.0)
    with clock.timed("final_evaluation"):
        with clock.timed("evaluation"):
            pass
    assert set(clock.timings) == {"evaluation", "total", "final_evaluation", "after_loop_evaluation"}
    assert clock.timings["final_evaluation"] >= clock.timings["after_loop_evaluation"]
