"""The LR schedule and SWA timeline, counted in optimizer steps."""

import math

import pytest
import torch

from swa_accel.runner.config import ConfigError, SWAArguments, RunArguments
from swa_accel.runner.lr_schedule import lr_curve, make_plan, make_scheduler, pre_swa_factor
from swa_accel.swa_lr import SWALRPhase


def args(**overrides):
    training_keys = {f for f in RunArguments.__dataclass_fields__}
    training = RunArguments(**{k: v for k, v in overrides.items() if k in training_keys})
    swa = SWAArguments(**{k: v for k, v in overrides.items() if k not in training_keys})
    return training, swa


def lrs(batches_per_epoch, **overrides):
    training, swa = args(**overrides)
    plan = make_plan(batches_per_epoch, training, swa)
    return plan, lr_curve(plan, training, swa)


def test_swa_start_by_fraction_epoch_and_step():
    plan, _ = lrs(10, num_train_epochs=8)
    assert (plan.total_steps, plan.steps_per_epoch, plan.swa_start_step) == (80, 10, 60)
    assert lrs(10, num_train_epochs=8, swa_start_epoch=3)[0].swa_start_step == 30
    assert lrs(10, num_train_epochs=8, swa_start_step=17)[0].swa_start_step == 17
    assert lrs(10, num_train_epochs=8, swa_method="none")[0].swa_start_step is None


def test_gradient_accumulation_counts_optimizer_steps():
    # 10 micro-batches per epoch with 4 accumulation steps: 3 optimizer steps (the last one short).
    plan, _ = lrs(10, num_train_epochs=2, gradient_accumulation_steps=4)
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 6)


def test_lr_is_identical_for_the_same_global_batch_whatever_the_layout():
    # 1000 samples: 1 process x 32; 2 processes x 16 (accelerate deals ceil(32 batches / 2) each);
    # 1 process x 8 with 4 accumulation steps.
    samples = 1000
    one = lrs(math.ceil(samples / 32), num_train_epochs=4, swa_lr=0.05)[1]
    two = lrs(math.ceil(math.ceil(samples / 16) / 2), num_train_epochs=4, swa_lr=0.05)[1]
    accum = lrs(math.ceil(samples / 8), num_train_epochs=4, swa_lr=0.05, gradient_accumulation_steps=4)[1]
    assert one == two == accum
    assert len(one) == 4 * 32


def test_warmup_then_cosine_then_swalr_style_anneal_to_constant():
    plan, values = lrs(10, num_train_epochs=10, learning_rate=0.1, num_warmup_steps=5, lr_scheduler_type="cosine",
                       swa_start_epoch=6, swa_lr=0.02, swa_anneal_steps=10, swa_anneal_strategy="cos")
    assert values[0] == pytest.approx(0.1 / 5)
    assert values[4] == pytest.approx(0.1)
    start = plan.swa_start_step
    pre = 0.1 * 0.5 * (1 + math.cos(math.pi * (start - 6) / 95))  # the last rate used before the SWA phase
    assert values[start - 1] == pytest.approx(pre)
    # The anneal moves monotonically from the last pre-SWA rate to swa_lr (as SWALR), reaching it after 10 steps.
    anneal = values[start:start + 10]
    assert all(a > b for a, b in zip([pre] + anneal, anneal))
    alpha = (1 - math.cos(math.pi * 1 / 10)) / 2
    assert anneal[0] == pytest.approx(0.02 * alpha + pre * (1 - alpha))
    assert all(v == pytest.approx(0.02) for v in values[start + 9:])


def test_linear_anneal_and_default_anneal_of_one_epoch():
    plan, values = lrs(8, num_train_epochs=4, learning_rate=0.1, lr_scheduler_type="constant", swa_start_epoch=2,
                       swa_lr=0.05, swa_anneal_strategy="linear")
    assert plan.anneal_steps == 8
    start = plan.swa_start_step
    assert values[start] == pytest.approx(0.1 - 0.05 / 8)
    assert values[start + 7] == pytest.approx(0.05)


def test_linear_constant_and_one_cycle_shapes():
    _, linear = lrs(10, num_train_epochs=10, lr_scheduler_type="linear", swa_method="none")
    assert linear[0] == pytest.approx(0.1) and linear[50] == pytest.approx(0.05)
    _, constant = lrs(10, num_train_epochs=10, lr_scheduler_type="constant", swa_method="none")
    assert set(constant) == {0.1}
    _, cycle = lrs(10, num_train_epochs=10, lr_scheduler_type="one_cycle", swa_method="none")
    peak = max(range(100), key=lambda i: cycle[i])
    assert peak == 30 and cycle[0] == pytest.approx(0.004) and cycle[-1] < 0.001


def test_scheduler_and_swa_phase_give_the_planned_curve_and_the_state_holds_no_code():
    training, swa = args(num_train_epochs=3, swa_lr=0.01, learning_rate=0.1)
    plan = make_plan(4, training, swa)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=training.learning_rate)
    scheduler = make_scheduler(optimizer, plan, training)
    clock = StepCount()
    SWALRPhase(optimizer, swa.swa_lr_values(), plan.swa_start_step, plan.anneal_steps, "cos", clock)
    seen = []
    for step in range(plan.total_steps):
        optimizer.step()  # (the phase's pre-hook sets the rate of an SWA-phase step right before it)
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
        clock.done = step + 1
    assert seen == pytest.approx(lr_curve(plan, training, swa))
    assert seen[:plan.swa_start_step] == pytest.approx(
        [pre_swa_factor(s, training, plan.total_steps) * 0.1 for s in range(plan.swa_start_step)])
    assert scheduler.state_dict()["lr_lambdas"] == [None]
    torch.save(scheduler.state_dict(), "/dev/null")


def test_swa_start_past_the_end_is_a_config_error_naming_the_field():
    training, swa = args(num_train_epochs=5, swa_start_epoch=5)
    with pytest.raises(ConfigError, match="^swa_start_epoch:"):
        make_plan(10, training, swa)
    training, swa = args(num_train_epochs=5, swa_start_step=50)
    with pytest.raises(ConfigError, match="^swa_start_step:"):
        make_plan(10, training, swa)


def test_averaging_timeline():
    plan, _ = lrs(10, num_train_epochs=4, swa_start_epoch=2, swa_update_every_steps=5)
    updates = [s for s in range(1, 41) if plan.update_after_step(s)]
    assert updates == [25, 30, 35, 40]
    plan, _ = lrs(10, num_train_epochs=4, swa_start_epoch=2)
    assert [s for s in (10, 20, 30, 40) if plan.update_at_epoch_end(s)] == [30, 40]


class StepCount:
    """The optimizer-step count a phase reads (the SWA object's `steps_done` in a run)."""

    def __init__(self, done: int = 0) -> None:
        self.done = done

    def __call__(self) -> int:
        return self.done


def swalr_twins(rates, swa_lr, anneal_epochs, pre_swa_gamma=0.9, tensor_rates=False, clock=None):
    """Two identical optimizers with one group per rate: ours under `SWALRPhase`, theirs under torch's `SWALR`,
    both after an ExponentialLR (so the last rate used differs from the schedule's next value). `tensor_rates`:
    each group's rate is a tensor, which torch's schedulers write in place."""
    from torch.optim.swa_utils import SWALR

    def optimizer():
        return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))],
                                 "lr": torch.tensor(lr) if tensor_rates else lr} for lr in rates], lr=0.1,
                               foreach=False)

    ours, theirs = optimizer(), optimizer()
    clock = clock if clock is not None else StepCount()
    return (ours, torch.optim.lr_scheduler.ExponentialLR(ours, pre_swa_gamma),
            theirs, torch.optim.lr_scheduler.ExponentialLR(theirs, pre_swa_gamma),
            lambda start: SWALRPhase(ours, swa_lr if isinstance(swa_lr, list) else [swa_lr], start, anneal_epochs,
                                     "cos", clock),
            SWALR(theirs, swa_lr=swa_lr, anneal_epochs=anneal_epochs))


def rates_of(optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


@pytest.mark.parametrize("swa_lr,tensor_rates", [(5e-4, False), ([5e-4, 3e-3], False), ([5e-4, 3e-3], True)])
def test_the_swa_phase_matches_swalr_step_for_step(swa_lr, tensor_rates):
    """As in torch's SWALR usage, the pre-SWA scheduler steps until the SWA start and SWALR after it. Ours runs
    the same curve from the optimizer the user built: one `swa_lr` for every group, or one per group, annealed from
    the last rate each group used; the user's scheduler may go on stepping, it moves nothing in the SWA phase.
    Tensor rates (which torch's schedulers change in place) give the same curve: the anneal's start is a copy."""
    start, total = 6, 14
    clock = StepCount()
    ours, our_scheduler, theirs, their_scheduler, make_phase, swalr = swalr_twins(
        (1e-3, 2e-3), swa_lr, 3, tensor_rates=tensor_rates, clock=clock)
    make_phase(start)
    for step in range(total):
        ours.step(), theirs.step()  # (the phase sets our rate right before a step of the SWA phase)
        used = rates_of(ours)
        assert used == pytest.approx(rates_of(theirs), rel=1e-6 if tensor_rates else 1e-12), step
        assert isinstance(ours.param_groups[0]["lr"], torch.Tensor) == tensor_rates
        our_scheduler.step()  # the user's scheduler keeps stepping: the phase overrides it
        clock.done = step + 1
        if step + 1 < start:
            their_scheduler.step()
        else:
            swalr.step()
    expected = swa_lr if isinstance(swa_lr, list) else [swa_lr, swa_lr]
    assert used == pytest.approx(expected, rel=1e-6)


def test_the_anneal_start_travels_with_the_optimizer_state():
    """A run resumed inside the anneal goes on from the saved start (the last pre-SWA rate), not from whatever
    rate the restored groups or a scheduler hold."""
    def run(optimizer, scheduler, clock, steps):
        used = []
        for _ in range(steps):
            optimizer.step()
            used.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
            clock.done += 1
        return used

    clocks = StepCount(), StepCount(), StepCount(7)
    ours, scheduler, *_ = swalr_twins((1e-3,), 5e-4, 4)
    SWALRPhase(ours, [5e-4], 5, 4, "cos", clocks[0])
    reference = run(ours, scheduler, clocks[0], 9)
    first, first_scheduler, *_ = swalr_twins((1e-3,), 5e-4, 4)
    SWALRPhase(first, [5e-4], 5, 4, "cos", clocks[1])
    run(first, first_scheduler, clocks[1], 7)
    resumed, fresh_scheduler, *_ = swalr_twins((1e-3,), 5e-4, 4)  # (its scheduler starts over at 1e-3)
    resumed.load_state_dict(first.state_dict())
    SWALRPhase(resumed, [5e-4], 5, 4, "cos", clocks[2])
    assert run(resumed, fresh_scheduler, clocks[2], 2) == pytest.approx(reference[7:], rel=1e-12)
    assert reference[4] > reference[5] > reference[7] > 5e-4


def test_swa_lr_lists_are_checked_against_the_param_groups():
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(2)], lr=0.1)
    with pytest.raises(ConfigError, match="^swa_lr: 3 values for an optimizer with 2 param groups"):
        SWALRPhase(optimizer, [0.1, 0.2, 0.3], 0, 1, "cos", StepCount())
    assert SWAArguments(swa_lr="0.05, 0.01").swa_lr_values() == (0.05, 0.01)
    assert SWAArguments(swa_lr=[0.05, 0.01]).swa_lr == [0.05, 0.01]
    assert SWAArguments(swa_lr=0.05).swa_lr == 0.05
    with pytest.raises(ConfigError, match="^swa_lr: must be > 0, got -0.1"):
        SWAArguments(swa_lr="0.1,-0.1")
