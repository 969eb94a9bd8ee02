"""The LR schedule and SWA timeline, counted in optimizer steps."""

import math

import pytest
import torch

from swa_accel.config import ConfigError, SWAArguments, TrainingArguments
from swa_accel.schedule import lr_factor, make_plan, make_scheduler


def args(**overrides):
    training_keys = {f for f in TrainingArguments.__dataclass_fields__}
    training = TrainingArguments(**{k: v for k, v in overrides.items() if k in training_keys})
    swa = SWAArguments(**{k: v for k, v in overrides.items() if k not in training_keys})
    return training, swa


def lrs(batches_per_epoch, **overrides):
    training, swa = args(**overrides)
    plan = make_plan(batches_per_epoch, training, swa)
    return plan, [lr_factor(s, plan, training, swa) * training.learning_rate for s in range(plan.total_steps)]


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
    pre = 0.1 * 0.5 * (1 + math.cos(math.pi * (start - 5) / (100 - 5)))
    assert values[start - 1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (start - 6) / 95)))
    # The anneal moves monotonically from the pre-SWA value to swa_lr, reaching it after 10 steps.
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


def test_scheduler_steps_follow_the_factor_and_its_state_holds_no_code():
    training, swa = args(num_train_epochs=3, swa_lr=0.01, learning_rate=0.1)
    plan = make_plan(4, training, swa)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=training.learning_rate)
    scheduler = make_scheduler(optimizer, plan, training, swa)
    seen = []
    for _ in range(plan.total_steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_factor(s, plan, training, swa) * 0.1 for s in range(plan.total_steps)])
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


def test_the_swa_phase_matches_swalr_per_group_with_the_optimizers_own_rates():
    """Each group's base is the optimizer's LR, never `learning_rate`: two AdamW groups at 1e-3 and 2e-3 while
    `learning_rate` keeps its default 0.1 (which once made the SWA phase run 100x too low) follow torch's
    `SWALR` step for step, and both end at `swa_lr`, as SWALR sets every group to it."""
    from torch.optim.swa_utils import SWALR

    def optimizer():
        return torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (1e-3, 2e-3)])

    training, swa = args(num_train_epochs=4, lr_scheduler_type="constant", swa_start_epoch=2, swa_lr=5e-4,
                         swa_anneal_steps=3)
    assert training.learning_rate == 0.1
    plan = make_plan(5, training, swa)
    ours, theirs = optimizer(), optimizer()
    scheduler, swalr = make_scheduler(ours, plan, training, swa), SWALR(theirs, swa_lr=5e-4, anneal_epochs=3)
    for step in range(plan.total_steps):
        assert [g["lr"] for g in ours.param_groups] == pytest.approx([g["lr"] for g in theirs.param_groups],
                                                                       rel=1e-12), step
        ours.step(), theirs.step()
        scheduler.step()
        if step + 1 >= plan.swa_start_step:
            swalr.step()
    assert [g["lr"] for g in ours.param_groups] == pytest.approx([5e-4, 5e-4], rel=1e-12)
    assert scheduler.state_dict()["lr_lambdas"] == [None, None]  # (still no code in the saved state)
