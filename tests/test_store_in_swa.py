"""The snapshot store inside `SWA` (issue 23), in a user's loop in this process: later starts as windows of the store
(equal to the in-memory candidates, with no copy each), LAWA, post-hoc EMA, BEMA and the greedy soup scored as
candidates; the store resumed through accelerate's checkpoints; a disk budget; a user's avg_fn/multi_avg_fn against
torch's AveragedModel; reset; timm's EMA warmup."""

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from swa_accel import SWA, ConfigError, SWAArguments
from swa_accel.candidates import Choice

EPOCHS = 6
STORE = dict(snapshot_every="every_epoch", swa_start_candidates="every_epoch", lawa_ks="1,2", bema=True,
             posthoc_ema_widths="0.05,0.1,0.2", soup=True)


def setup(tmp_path=None, epochs=EPOCHS, **overrides):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    set_seed(0)
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 4, generator=generator)
    data = TensorDataset(inputs, (inputs[:, 0] + 0.5 * inputs[:, 1] > 0).long())
    loader = DataLoader(data, batch_size=8, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    args = SWAArguments(**{"swa_start_epoch": 1, "swa_lr": 0.05, "swa_anneal_steps": 0, **overrides})
    store_dir = None if tmp_path is None else tmp_path / "snapshots"
    swa = SWA(accelerator, model, optimizer, loader, args, num_epochs=epochs, store_dir=store_dir, verbose=False)
    return accelerator, model, optimizer, loader, swa


def train(model, optimizer, loader, swa, epochs, after_step=None):
    for _ in range(epochs):
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            swa.step()
            if after_step is not None:
                after_step()


def validation_of(loader):
    def evaluate(module):
        module.eval()
        with torch.no_grad():
            losses = [F.cross_entropy(module(x), y).item() for x, y in loader]
        return {"validation": {"nll": sum(losses) / len(losses)}}

    return evaluate


def test_later_starts_are_windows_of_the_store_and_every_family_is_scored(tmp_path):
    _, model, optimizer, loader, swa = setup(tmp_path, **STORE)
    train(model, optimizer, loader, swa, EPOCHS)
    # the later starts hold no copy in memory: they are windows of the store
    assert [n for n, (_, copy_) in swa.averager.starts.items() if copy_ is not None] == []
    assert sorted(swa.averager.store_starts) == [f"swa_from_epoch_{e}" for e in range(2, EPOCHS)]
    # ... and equal the same candidates kept as copies, in a run without the store
    _, model2, optimizer2, loader2, plain = setup(None, swa_start_candidates="every_epoch")
    train(model2, optimizer2, loader2, plain, EPOCHS)
    for epoch in range(1, EPOCHS):
        name = f"swa_from_epoch_{epoch}"
        ours, theirs = swa.averager.candidate_tensors(name), plain.averager.candidate_tensors(name)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7)

    choice, module = swa.score_candidates(validation_of(loader), "validation", "nll")
    assert isinstance(choice, Choice) and module is not None
    names = [c.name for c in choice.candidates]
    assert names == [f"swa_from_epoch_{e}" for e in range(1, EPOCHS)] + [
        "lawa_last_1", "lawa_last_2", "posthoc_ema_0.05", "posthoc_ema_0.1", "posthoc_ema_0.2", "bema", "soup"]
    kinds = {c.name: c.kind for c in choice.candidates}
    assert kinds["lawa_last_2"] == "lawa" and kinds["posthoc_ema_0.1"] == "posthoc_ema" and kinds["soup"] == "soup"
    soup = next(c for c in choice.candidates if c.name == "soup")
    best_single = min(c.metrics["validation"]["nll"] for c in choice.candidates if c.name != "soup")
    assert soup.metrics["validation"]["nll"] <= best_single  # the soup starts as the best and only improves
    assert soup.settings["ingredients"][0] == min(
        (c for c in choice.candidates if c.name != "soup"), key=lambda c: c.metrics["validation"]["nll"]).name
    # LAWA's record: its k points, starting after the point before its first (as the SWA window of the last k epochs)
    records = {c.name: c for c in choice.candidates}
    assert [(records[n].n_averaged, records[n].start_epoch) for n in ("lawa_last_1", "lawa_last_2")] == [(1, 5), (2, 4)]
    # LAWA over 1 point is the last iterate
    last = {k: v.detach() for k, v in model.named_parameters()}
    lawa = swa.averager.candidate_tensors("lawa_last_1")
    for key, value in last.items():
        torch.testing.assert_close(lawa[key], value)


def test_a_chosen_soup_is_the_module_returned_the_mean_of_its_ingredients(tmp_path):
    # A validation "loss" that is the distance to the midpoint of two post-hoc EMAs: the soup of the two is exact.
    _, model, optimizer, loader, swa = setup(tmp_path, **STORE)
    train(model, optimizer, loader, swa, EPOCHS)
    ends = [swa.averager.candidate_tensors(name) for name in ("posthoc_ema_0.05", "posthoc_ema_0.1")]
    target = {k: (ends[0][k].double() + ends[1][k].double()) / 2 for k, _ in model.named_parameters()}

    def distance(module):
        params = dict(module.named_parameters())
        return {"validation": {"nll": sum((params[k].double() - t).square().sum().item() for k, t in target.items())}}

    choice, module = swa.score_candidates(distance, "validation", "nll")
    soup = next(c for c in choice.candidates if c.name == "soup")
    assert choice.chosen == "soup" and sorted(soup.settings["ingredients"]) == ["posthoc_ema_0.05", "posthoc_ema_0.1"]
    assert soup.metrics["validation"]["nll"] < min(c.metrics["validation"]["nll"] for c in choice.candidates[:-1])
    ingredients = [swa.averager.candidate_tensors(name) for name in soup.settings["ingredients"]]
    for key, value in module.named_parameters():
        mean = torch.stack([tensors[key].double() for tensors in ingredients]).mean(0)
        torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7)
    assert distance(module)["validation"]["nll"] == pytest.approx(soup.metrics["validation"]["nll"], rel=1e-6)
    # BN statistics recomputed for the soup itself (a pass over the data: no ingredient's own buffers)
    assert int(dict(module.named_buffers())["1.num_batches_tracked"]) == len(loader)


def test_a_run_without_swa_keeps_only_the_store_and_every_candidate_is_built_from_it(tmp_path):
    # swa_method none with snapshot_every: the optimizer's own rate throughout (swa_lr and swa_start_epoch of the
    # setup are unused), and the store folds every epoch end from the first, so its windows start at epoch 0.
    epoch_ends = []
    _, model, optimizer, loader, swa = setup(tmp_path, swa_method="none", **STORE)
    steps = len(loader)

    def record():
        if swa.steps_done % steps == 0:
            epoch_ends.append({k: v.detach().double().clone() for k, v in model.named_parameters()})

    train(model, optimizer, loader, swa, EPOCHS, after_step=record)
    assert swa.store_only and swa.lr_phase is None
    assert [group["lr"] for group in optimizer.param_groups] == [0.1]
    assert [p.step for p in swa.averager.store.points] == [steps * e for e in range(1, EPOCHS + 1)]
    assert swa.averager.candidate_names() == [f"swa_from_epoch_{e}" for e in range(EPOCHS)] + [
        "lawa_last_1", "lawa_last_2", "posthoc_ema_0.05", "posthoc_ema_0.1", "posthoc_ema_0.2", "bema"]
    for name, first in (("swa_from_epoch_0", 0), ("swa_from_epoch_4", 4), ("lawa_last_2", 4), ("lawa_last_1", 5)):
        built = swa.averager.candidate_tensors(name)
        for key, value in epoch_ends[-1].items():
            mean = torch.stack([weights[key] for weights in epoch_ends[first:]]).mean(0)
            torch.testing.assert_close(built[key].double(), mean, rtol=1e-6, atol=1e-7)
    choice, module = swa.score_candidates(validation_of(loader), "validation", "nll")
    assert [c.name for c in choice.candidates][-1] == "soup" and len(choice.candidates) == 13
    best = min(choice.candidates, key=lambda c: c.metrics["validation"]["nll"])
    assert choice.chosen == best.name and module is not None


def test_explicit_windows_are_candidates_and_their_ends_must_be_store_points(tmp_path):
    epoch_ends = []
    _, model, optimizer, loader, swa = setup(tmp_path, snapshot_every="every_epoch", store_windows="1-3,2-4,3-6")
    steps = len(loader)

    def record():
        if swa.steps_done % steps == 0:
            epoch_ends.append({k: v.detach().double().clone() for k, v in model.named_parameters()})

    train(model, optimizer, loader, swa, EPOCHS, after_step=record)
    assert swa.averager.candidate_names()[-3:] == ["window_epochs_1_3", "window_epochs_2_4", "window_epochs_3_6"]
    for first, last in ((1, 3), (2, 4), (3, 6)):  # the folds after epoch `first` through epoch `last`
        name = f"window_epochs_{first}_{last}"
        assert swa.averager.candidate_updates(name) == last - first
        built = swa.averager.candidate_tensors(name)
        for key in epoch_ends[0]:
            mean = torch.stack([weights[key] for weights in epoch_ends[first:last]]).mean(0)
            torch.testing.assert_close(built[key].double(), mean, rtol=1e-6, atol=1e-7)
    choice, _ = swa.score_candidates(validation_of(loader), "validation", "nll")
    window = next(c for c in choice.candidates if c.name == "window_epochs_2_4")
    assert (window.kind, window.start_epoch, window.n_averaged) == ("window", 2.0, 2)
    assert window.settings["after_epoch"] == 2 and window.settings["through_epoch"] == 4

    with pytest.raises(ConfigError, match=r"^store_windows: window_epochs_1_3 ends after epoch 3, which is not a "
                                          r"store point \(points after epochs 2, 4, 6\)"):
        setup(tmp_path / "off", snapshot_every="every_2_epochs", store_windows="1-3")
    with pytest.raises(ConfigError, match=r"^store_windows: each window is A-B in whole epochs with A < B"):
        SWAArguments(snapshot_every="every_epoch", store_windows="3-1")
    with pytest.raises(ConfigError, match=r"^store_windows: built from the snapshot store"):
        SWAArguments(store_windows="1-3")


def test_the_store_resumes_through_accelerates_checkpoints_bit_identically(tmp_path):
    accelerator, model, optimizer, loader, swa = setup(tmp_path / "whole", **STORE)
    train(model, optimizer, loader, swa, EPOCHS)
    whole = {n: swa.averager.candidate_tensors(n) for n in swa.averager.candidate_names()}

    accelerator, model, optimizer, loader, swa = setup(tmp_path / "split", **STORE)
    train(model, optimizer, loader, swa, 3)
    accelerator.save_state(str(tmp_path / "checkpoint"))
    train(model, optimizer, loader, swa, 1)  # the interrupted run goes on a little
    accelerator, model, optimizer, loader, swa = setup(tmp_path / "split", **STORE)
    accelerator.load_state(str(tmp_path / "checkpoint"))
    train(model, optimizer, loader, swa, EPOCHS - 3)
    split = {n: swa.averager.candidate_tensors(n) for n in swa.averager.candidate_names()}
    assert list(split) == list(whole)
    for name in whole:
        assert all(torch.equal(whole[name][k], split[name][k]) for k in whole[name]), name


def test_a_disk_budget_thins_the_points_and_names_the_dropped_candidates(tmp_path, capsys):
    floats = 4 * 16 + 16 + 16 * 2 + 16 * 2 + 2 + 16  # the averaged parameters
    per_point = 4 * floats * 3  # a segment and two power EMAs
    budget_mb = (per_point * 3 + 4 * floats * 2) / 2 ** 20  # 3 points and LAWA's 2 weights
    _, model, optimizer, loader, swa = setup(tmp_path, snapshot_every="every_epoch",
                                             swa_start_candidates="every_epoch", lawa_ks="2",
                                             snapshot_disk_budget_mb=budget_mb)
    assert swa.store_plan.cut_steps == (16, 32, 48) and swa.store_plan.dropped_steps == (24, 40)
    assert swa.dropped == {"swa_from_epoch_3", "swa_from_epoch_5"}
    assert any("dropped candidates: swa_from_epoch_3, swa_from_epoch_5" in line for line in swa.store_lines())
    train(model, optimizer, loader, swa, EPOCHS)
    assert "swa_from_epoch_3" not in swa.averager.candidate_names()
    assert [p.step for p in swa.averager.store.points] == [16, 32, 48]
    with pytest.raises(ConfigError, match="holds not even the last point"):
        setup(tmp_path / "tiny", snapshot_every="every_epoch", snapshot_disk_budget_mb=1e-6)


def test_a_lawa_over_more_points_than_the_run_has_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"^lawa_ks: LAWA over the last 9 points, but the store has 5 in this run "
                                          r"\(after epochs 2, 3, 4, 5, 6\); choose k up to 5"):
        setup(tmp_path, snapshot_every="every_epoch", lawa_ks="1,9")


def test_the_store_needs_a_folder_and_its_options_need_the_store(tmp_path):
    with pytest.raises(ConfigError, match="pass store_dir"):
        setup(None, snapshot_every="every_epoch")
    with pytest.raises(ConfigError, match="lawa_ks: built from the snapshot store"):
        SWAArguments(lawa_ks="3")
    with pytest.raises(ConfigError, match="snapshot_from: built from the snapshot store"):
        SWAArguments(snapshot_from="start")
    with pytest.raises(ConfigError, match="posthoc_ema_widths: built from the snapshot store"):
        SWAArguments(posthoc_ema_widths="0.07")
    with pytest.raises(ConfigError, match="posthoc_ema_tracked: built from the snapshot store"):
        SWAArguments(posthoc_ema_tracked="0.05,0.2")
    SWAArguments(posthoc_ema_tracked="none", posthoc_ema_widths="0.02,0.05,0.1,0.15,0.2")  # (off, or the defaults)
    with pytest.raises(ConfigError, match="snapshot_every: must be every_epoch"):
        SWAArguments(snapshot_every="weekly")
    with pytest.raises(ConfigError, match="two or more different widths"):
        SWAArguments(snapshot_every="every_epoch", posthoc_ema_tracked="0.1")
    (tmp_path / "snapshots").write_text("a file where the store's folder goes")
    with pytest.raises(ConfigError, match=r"^store_dir: cannot make the snapshot store's folder .*/snapshots \(File "
                                          r"exists\)$"):
        setup(tmp_path, snapshot_every="every_epoch")


@pytest.mark.parametrize("form", ["avg_fn", "multi_avg_fn"])
def test_a_users_averaging_function_matches_torchs_averaged_model(form):
    # torch's own EMA functions, given as a custom averaging function, in both of torch's forms
    fn = get_ema_avg_fn(0.9) if form == "avg_fn" else get_ema_multi_avg_fn(0.9)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    set_seed(0)
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    reference = AveragedModel(copy.deepcopy(model), **{form: fn})
    swa = SWA(accelerator, model, optimizer, loader, SWAArguments(swa_start_epoch=1, swa_update_every_steps=1),
              num_epochs=3, verbose=False, **{form: fn})
    averaged_steps = []

    def follow():
        if swa.plan.update_after_step(swa.steps_done):
            reference.update_parameters(model)
            averaged_steps.append(swa.steps_done)

    train(model, optimizer, loader, swa, 3, after_step=follow)
    assert len(averaged_steps) == swa.n_averaged == 16
    ours = swa.averager.averaged
    for name, value in reference.module.named_parameters():
        torch.testing.assert_close(ours[name], value.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="not both"):
        SWA(accelerator, model, optimizer, loader, SWAArguments(swa_start_epoch=1), num_epochs=3, verbose=False,
            avg_fn=get_ema_avg_fn(0.9), multi_avg_fn=get_ema_multi_avg_fn(0.9))


def test_reset_restarts_the_average_from_the_current_weights(tmp_path):
    _, model, optimizer, loader, swa = setup(None, swa_update_every_steps=1, swa_start_candidates="every_epoch")
    train(model, optimizer, loader, swa, 3)
    swa.reset_average()
    current = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert swa.n_averaged == 1 and swa.averager.starts == {"swa_reset_at_epoch_3": (0, None)}
    for key, value in current.items():
        assert torch.equal(swa.averager.averaged[key], value)
    snapshots = [current]
    for x, y in list(loader)[:3]:  # three more updates: the mean of the four
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        swa.step()
        snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})
    for key in current:
        torch.testing.assert_close(swa.averager.averaged[key], torch.stack([s[key] for s in snapshots]).mean(0))


def test_after_a_reset_the_restarted_average_is_scored_and_earlier_starts_are_dropped(tmp_path):
    """Reset after epoch 3 of 6 with later starts every epoch and the store: the candidates are the restarted
    average (its own name, start and count), the starts after the reset, and the store's families; none of the
    starts that began before comes back as a copy taken after the reset. A checkpoint carries the reset."""
    accelerator, model, optimizer, loader, swa = setup(tmp_path, **STORE)
    epoch_ends = []

    def keep_epoch_end():
        if swa.steps_done % len(loader) == 0:
            epoch_ends.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
            if swa.steps_done == 3 * len(loader):
                swa.reset_average()

    train(model, optimizer, loader, swa, EPOCHS, after_step=keep_epoch_end)
    assert swa.reset_name() == "swa_reset_at_epoch_3"
    assert list(swa.averager.starts) == ["swa_reset_at_epoch_3", "swa_from_epoch_3", "swa_from_epoch_4",
                                         "swa_from_epoch_5"]
    choice, _ = swa.score_candidates(validation_of(loader), "validation", "nll")
    records = {c.name: c for c in choice.candidates}
    assert not {"swa_from_epoch_1", "swa_from_epoch_2"} & set(records)
    restarted = records["swa_reset_at_epoch_3"]
    assert (restarted.kind, restarted.start_step, restarted.n_averaged) == ("swa", 3 * len(loader), 4)
    # The restarted average: the weights at the reset and at the three epoch ends after it (float64 mean).
    for name, epochs in (("swa_reset_at_epoch_3", range(2, 6)), ("swa_from_epoch_4", range(4, 6))):
        built = swa.averager.candidate_tensors(name)
        for key in built:
            expected = torch.stack([epoch_ends[e][key] for e in epochs]).mean(0)
            torch.testing.assert_close(built[key].double(), expected, rtol=1e-5, atol=1e-7)
    assert records["swa_from_epoch_4"].n_averaged == 2
    assert {"lawa_last_1", "lawa_last_2", "bema", "soup"} <= set(records)  # the store's families go on
    # Through a checkpoint: a resumed object restores the reset step, so no earlier start comes back.
    state = swa.state_dict()
    *_, again = setup(tmp_path / "again", **STORE)
    again.load_state_dict(state)
    assert again.reset_name() == "swa_reset_at_epoch_3"
    with pytest.warns(UserWarning, match="past the budget"):  # (one step more: would earlier starts come back?)
        again.after_step(again.steps_done + 1, epoch_end=False, stepped=False)
    assert list(again.averager.starts) == list(swa.averager.starts)


def test_a_posthoc_width_that_few_points_reconstruct_shrunk_is_named_before_training(tmp_path):
    """EDM2's least squares (as ema-pytorch's) does not make the weights sum to 1: from 5 points tracking 0.05 and
    0.1, width 0.2 comes out scaled. The plan's warning gives the sum the finished store's reader then uses."""
    from swa_accel.store_families import posthoc_ema_weight_sums

    _, model, optimizer, loader, swa = setup(tmp_path, **STORE)
    warnings = [line for line in swa.store_lines() if line.startswith("warning: posthoc_ema_widths")]
    planned = posthoc_ema_weight_sums(swa.store_plan, swa.plan.steps_per_epoch, swa.args)
    assert [w for w, total in planned.items() if abs(total - 1) > 0.01] == [0.2]
    assert warnings == [f"warning: posthoc_ema_widths 0.2: from 5 points tracking 0.05,0.1, its least-squares "
                        f"weights sum to {planned[0.2]:.3f}, so that average is scaled by it, not a true average; "
                        "keep more points (a shorter snapshot_every) or track a width near it (posthoc_ema_tracked)"]
    train(model, optimizer, loader, swa, EPOCHS)
    reader = swa.averager.store_reader()
    assert [p.folds for p in reader.points] == swa.store_plan.folds_at_points(swa.plan.steps_per_epoch)
    for width, total in planned.items():
        assert sum(weight for _, weight in reader.posthoc_ema_weights(width)) == pytest.approx(total, abs=1e-9)


def test_training_past_the_planned_budget_says_so_once(tmp_path):
    _, model, optimizer, loader, swa = setup(tmp_path, epochs=2, snapshot_every="every_epoch", lawa_ks="1")
    train(model, optimizer, loader, swa, 2)
    with pytest.warns(UserWarning, match=r"^SWA: optimizer step 17 is past the budget SWA was planned for \(16 steps"
                                         r".*miss every step after it") as caught:
        train(model, optimizer, loader, swa, 1)
    assert len([w for w in caught if "past the budget" in str(w.message)]) == 1
    assert caught[0].filename == __file__  # (it points at the user's loop)


def test_timms_ema_warmup_decay():
    # timm's ModelEmaV3.get_decay with use_warmup: 1 - (1 + step / gamma) ** -power, clamped to [min_decay, decay]
    _, model, optimizer, loader, swa = setup(None, swa_method="ema", ema_decay=0.999, ema_warmup_power=0.75,
                                             ema_warmup_gamma=2.0, ema_min_decay=0.1)
    averager = swa.averager
    for n, expected in ((0, 0.1), (1, 1 - 1.5 ** -0.75), (10, 1 - 6.0 ** -0.75), (10 ** 6, 0.999)):
        averager.n_averaged = n
        assert averager._decay() == pytest.approx(expected, rel=1e-12), n
