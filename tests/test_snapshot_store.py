"""The snapshot store (issue 23): windows against the float64 mean of the same snapshots, LAWA, post-hoc EMA against
a directly tracked EMA and against ema-pytorch's solver, BEMA against TRL's callback, and a resumed store equal to
an uninterrupted one file for file."""

import json
import types

import pytest
import torch

from swa_accel.power_ema import (gamma_of_sigma_rel, power_decay, reconstruction_weights,
                                 sigma_rel_of_gamma)
from swa_accel.snapshot_files import BackgroundWriter, read_tensors
from swa_accel.snapshots import INDEX, BEMASettings, SnapshotStore
from swa_accel import StoreReader  # (as users import it)

SHAPES = {"conv.weight": (4, 3, 3, 3), "fc.weight": (10, 4), "fc.bias": (10,)}
ONE = torch.tensor(1.0)


def trajectory(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A noisy drifting random walk of weights, like SGD's iterates, in float64 (the reference's precision)."""
    generator = torch.Generator().manual_seed(seed)
    current = {n: torch.randn(s, generator=generator, dtype=torch.float64) for n, s in SHAPES.items()}
    drift = {n: torch.randn(s, generator=generator, dtype=torch.float64) * 0.01 for n, s in SHAPES.items()}
    walk = []
    for _ in range(steps):
        current = {n: v + drift[n] + 0.05 * torch.randn(v.shape, generator=generator, dtype=torch.float64)
                   for n, v in current.items()}
        walk.append(current)
    return walk


def new_store(folder, **kwargs) -> SnapshotStore:
    like = {n: torch.zeros(s) for n, s in SHAPES.items()}
    return SnapshotStore(folder, like, torch.device("cpu"), rank=0, **kwargs)


def drive(store, walk, cut_every: int, first_step: int = 1, stop: int = None):
    for step, weights in enumerate(walk[:stop], start=first_step):
        store.fold([weights[n].float() for n in store.names], ONE, step)
        if (step - first_step + 1) % cut_every == 0:
            store.cut(step, weights)
    store.wait()


def relative(a: dict, b: dict) -> float:
    return max(((a[n].double() - b[n].double()).norm() / b[n].double().norm()).item() for n in a)


def test_every_window_is_the_float64_mean_of_its_snapshots(tmp_path):
    walk = trajectory(40)
    store = new_store(tmp_path, keep_weights=3)
    drive(store, walk, cut_every=5)
    reader = StoreReader(tmp_path)  # from the files and store.json, as after the run
    assert [p.step for p in reader.points] == list(range(5, 41, 5)) and all(p.count == 5 for p in reader.points)
    for after in [None, *range(7)]:
        for through in range((0 if after is None else after + 1), 8):
            first = 0 if after is None else (after + 1) * 5
            expected = {n: torch.stack([w[n] for w in walk[first:(through + 1) * 5]]).mean(0) for n in SHAPES}
            assert relative(reader.window(after, through), expected) < 1e-6, (after, through)
    # LAWA: the mean of the weights at the last k points (those kept: 3)
    for k in (1, 2, 3):
        expected = {n: torch.stack([walk[step - 1][n] for step in (40, 35, 30)[:k]]).mean(0) for n in SHAPES}
        assert relative(reader.lawa(k), expected) < 1e-6
    with pytest.raises(ValueError, match="keeps the weights of 3"):
        reader.lawa(4)
    # A point index off the store is one line naming the range (a slice would have built another window).
    for call in (lambda: reader.window(0, 9), lambda: reader.window(-1, 2), lambda: reader.posthoc_ema(0.1, through=9),
                 lambda: reader.posthoc_ema(0.1, through=-1)):
        with pytest.raises(ValueError, match=r"is not a point index; this store has 8 points, 0 to 7"):
            call()
    with pytest.raises(ValueError, match="after must come before through"):
        reader.window(3, 3)
    store.drop_stale_weights()  # (stale weight files go at each checkpoint and at the end)
    assert sorted(p.name for p in tmp_path.glob("weights-*")) == [
        f"weights-{i:05d}.rank0.safetensors" for i in (5, 6, 7)]


def test_sigma_rel_and_gamma_are_inverse_and_match_edm2():
    # EDM2's two tracked EMAs: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94 (its algorithm 2, a cubic's root)
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert sigma_rel_of_gamma(gamma_of_sigma_rel(sigma)) == pytest.approx(sigma, rel=1e-9)
    assert power_decay(1, 7.0) == 0.0  # the first update is copied


def test_posthoc_ema_weights_match_ema_pytorchs_solver():
    from ema_pytorch.post_hoc_ema import solve_weights

    t_i = [100, 200, 300, 400] * 2
    gammas = [gamma_of_sigma_rel(0.05)] * 4 + [gamma_of_sigma_rel(0.10)] * 4
    for target in (0.03, 0.07, 0.15):
        ours = reconstruction_weights(t_i, gammas, 400, gamma_of_sigma_rel(target))
        theirs = solve_weights(torch.tensor(t_i), torch.tensor(gammas), torch.tensor([400]),
                               torch.tensor([gamma_of_sigma_rel(target)]))[:, 0]
        assert torch.allclose(ours, theirs.double(), rtol=1e-6, atol=1e-9), target


def tracked_power_ema(walk, sigma_rel):
    gamma, ema = gamma_of_sigma_rel(sigma_rel), None
    for t, weights in enumerate(walk, start=1):
        beta = power_decay(t, gamma)
        ema = {n: w.clone() for n, w in weights.items()} if ema is None else \
            {n: beta * ema[n] + (1 - beta) * weights[n] for n in weights}
    return ema


def test_posthoc_ema_reconstructs_tracked_and_untracked_widths(tmp_path):
    walk = trajectory(600, seed=1)
    store = new_store(tmp_path, sigma_rels=(0.05, 0.10), windows=False)
    drive(store, walk, cut_every=50)
    reader = StoreReader(tmp_path)
    # a tracked width at the last point: its own snapshot (least squares finds the unit vector)
    assert relative(reader.posthoc_ema(0.10), tracked_power_ema(walk, 0.10)) < 1e-5
    # widths between and around the tracked ones, against a power EMA tracked directly at that width
    for sigma, tolerance in ((0.07, 2e-3), (0.15, 5e-3), (0.04, 2e-3)):
        gap = relative(reader.posthoc_ema(sigma), tracked_power_ema(walk, sigma))
        # ... and much closer than either tracked EMA is to it
        nearest = min(relative(tracked_power_ema(walk, s), tracked_power_ema(walk, sigma)) for s in (0.05, 0.10))
        assert gap < tolerance and gap < nearest / 5, (sigma, gap, nearest)
    # at an earlier point, from the snapshots up to it
    assert relative(reader.posthoc_ema(0.10, through=5), tracked_power_ema(walk[:300], 0.10)) < 1e-5


def module_with(shapes) -> torch.nn.Module:
    """A module whose parameters are named as `shapes`' keys (zeros)."""
    model = torch.nn.Module()
    for name, shape in shapes.items():
        module_name, param = name.split(".")
        if not hasattr(model, module_name):
            model.add_module(module_name, torch.nn.Module())
        getattr(model, module_name).register_parameter(param, torch.nn.Parameter(torch.zeros(shape)))
    return model


def test_posthoc_ema_equals_ema_pytorchs_synthesis_on_the_same_snapshots(tmp_path):
    from ema_pytorch import PostHocEMA
    from ema_pytorch.post_hoc_ema import KarrasEMA

    walk = trajectory(600, seed=3)
    sigma_rels = (0.05, 0.10)
    store = new_store(tmp_path / "store", sigma_rels=sigma_rels, windows=False)
    drive(store, walk, cut_every=50)
    reader = StoreReader(tmp_path / "store")
    # The store's power-EMA snapshots as ema-pytorch's checkpoints ("<ema index>.<updates>.pt", a KarrasEMA's
    # state dict in fp32), so that its PostHocEMA synthesizes from exactly these snapshots.
    model = module_with(SHAPES)
    template = KarrasEMA(model, sigma_rel=0.05, update_every=1).state_dict()

    def ema_pytorch_reading(folder, points):
        for point in points:
            for index in range(len(sigma_rels)):
                snapshot = read_tensors(tmp_path / "store" / f"power{index}-{point.index:05d}.rank0.safetensors")
                state = dict(template, **{f"ema_model.{n}": snapshot[n] for n in SHAPES})
                folder.mkdir(exist_ok=True)
                torch.save(state, folder / f"{index}.{point.folds}.pt")
        return PostHocEMA(model, sigma_rels=sigma_rels, update_every=1, checkpoint_every_num_steps="manual",
                          checkpoint_folder=str(folder), checkpoint_dtype=torch.float32)

    def synthesized(ema, sigma):
        parameters = dict(ema.synthesize_ema_model(sigma_rel=sigma).ema_model.named_parameters())
        return {n: parameters[n].detach() for n in SHAPES}

    theirs = ema_pytorch_reading(tmp_path / "all", reader.points)
    for sigma in (0.04, 0.07, 0.10, 0.15):
        assert relative(reader.posthoc_ema(sigma), synthesized(theirs, sigma)) < 1e-5, sigma
    # ... and at an earlier point (the 10th, after 500 updates), from the snapshots up to it
    earlier = ema_pytorch_reading(tmp_path / "first_10", reader.points[:10])
    assert relative(reader.posthoc_ema(0.07, through=9), synthesized(earlier, 0.07)) < 1e-5


def test_bema_matches_trls_callback(tmp_path):
    from trl.trainer.callbacks import BEMACallback

    walk = trajectory(30, seed=2)
    settings = BEMASettings()
    store = new_store(tmp_path, bema=settings, windows=False)
    start = 5  # BEMA's burn-in (TRL's update_after): the store's first fold is at step 5, then one per step
    drive(store, walk[start:], cut_every=25, first_step=start)
    model = module_with(SHAPES)
    callback = BEMACallback(update_freq=1, update_after=start, ema_power=settings.ema_power,
                            bias_power=settings.bias_power, lag=int(settings.lag), multiplier=settings.multiplier)
    callback.running_model = types.SimpleNamespace(parameters=lambda: [torch.zeros(s) for s in SHAPES.values()])
    params = dict(model.named_parameters())
    for name, param in params.items():
        callback.param_names.append(name)
        callback.thetat_params.append(param)
        callback.theta0_params.append(param.detach().clone())
        callback.ema_params.append(param.detach().clone())
    outputs = []
    callback.running_model = types.SimpleNamespace(parameters=lambda: outputs)
    for step, weights in enumerate(walk[start:], start=start):
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name])
        outputs[:] = [torch.zeros(s) for s in SHAPES.values()]
        callback.on_step_end(None, types.SimpleNamespace(global_step=step), None, model)
    trl_bema = dict(zip(params, outputs))
    assert relative(StoreReader(tmp_path).bema(), trl_bema) < 1e-6


def test_a_resumed_store_equals_an_uninterrupted_one_file_for_file(tmp_path):
    walk = trajectory(40, seed=3)
    kwargs = dict(sigma_rels=(0.05, 0.10), bema=BEMASettings(), keep_weights=2)
    whole = new_store(tmp_path / "whole", **kwargs)
    drive(whole, walk, cut_every=5, stop=20)
    whole.state_dict()  # (the same checkpoint, kept: its weight files stay in both)
    drive(whole, walk[20:], cut_every=5, first_step=21)
    first = new_store(tmp_path / "split", **kwargs)
    drive(first, walk, cut_every=5, stop=20)
    torch.save(first.state_dict(), tmp_path / "state.pt")  # the checkpoint
    drive(first, walk[20:], cut_every=5, first_step=21, stop=7)  # the interrupted run goes on past its checkpoint
    second = new_store(tmp_path / "split", **kwargs)
    second.load_state_dict(torch.load(tmp_path / "state.pt"))
    drive(second, walk[20:], cut_every=5, first_step=21)
    second.drop_stale_weights()
    whole.drop_stale_weights()
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "split").iterdir())
    for name in names:
        if name == INDEX:
            assert json.loads((tmp_path / "whole" / name).read_text()) == \
                json.loads((tmp_path / "split" / name).read_text())
            continue
        a, b = read_tensors(tmp_path / "whole" / name), read_tensors(tmp_path / "split" / name)
        assert all(torch.equal(a[n], b[n]) for n in a), name


def test_the_weight_files_of_every_kept_checkpoint_stay_and_a_resume_from_the_older_one_finds_them(tmp_path):
    # LAWA over 2 points, a checkpoint at every point, the newest 2 checkpoints kept (the runner's default).
    walk = trajectory(30, seed=5)
    kwargs = dict(keep_weights=2, checkpoints_kept=2)
    store, states = new_store(tmp_path / "run", **kwargs), {}
    for stop in range(5, 31, 5):
        drive(store, walk[stop - 5:], cut_every=5, first_step=stop - 4, stop=5)
        states[stop] = store.state_dict()
    store.drop_stale_weights()  # (the end of the run)
    weights = sorted(p.name for p in (tmp_path / "run").glob("weights-*"))
    # The checkpoints at steps 25 (points 3, 4) and 30 (points 4, 5) are kept; the files of older ones went.
    assert weights == [f"weights-{i:05d}.rank0.safetensors" for i in (3, 4, 5)]
    # A resume from the older kept checkpoint (step 25) builds its LAWA from its own files.
    resumed = new_store(tmp_path / "run", **kwargs)
    resumed.load_state_dict(states[25])
    expected = {n: (walk[19][n] + walk[24][n]) / 2 for n in SHAPES}
    assert relative(StoreReader(tmp_path / "run", points=resumed.points, layout=resumed.layout).lawa(2),
                    expected) < 1e-6


def test_a_failed_write_is_raised_at_the_next_wait(tmp_path):
    writer = BackgroundWriter()
    writer.submit(tmp_path / "missing_folder" / "x.safetensors", {"a": torch.zeros(2)})
    with pytest.raises(OSError, match="snapshot store: a snapshot could not be written"):
        writer.wait()
    writer.submit(tmp_path / "x.safetensors", {"a": torch.ones(2)})
    writer.wait()
    assert torch.equal(read_tensors(tmp_path / "x.safetensors")["a"], torch.ones(2))


def test_the_writer_keeps_at_most_its_bound_of_copies_waiting(tmp_path, monkeypatch):
    import time

    from swa_accel import snapshot_files

    seen, written = [], []
    real_write = snapshot_files.write_tensors

    def slow_write(path, tensors):  # a disk slower than the points come
        seen.append(writer._pending_bytes)
        time.sleep(0.05)
        real_write(path, tensors)
        written.append(path.name)

    monkeypatch.setattr(snapshot_files, "write_tensors", slow_write)
    writer = BackgroundWriter(max_pending_bytes=2 * 4000)  # two files of 1000 fp32 numbers
    for i in range(6):
        writer.submit(tmp_path / f"f{i}.safetensors", {"a": torch.full((1000,), float(i))})
        assert writer._pending_bytes <= 8000
    writer.wait()
    assert max(seen) <= 8000 and written == [f"f{i}.safetensors" for i in range(6)]
    assert all(torch.equal(read_tensors(tmp_path / f"f{i}.safetensors")["a"], torch.full((1000,), float(i)))
               for i in range(6))


def test_bema_at_a_point_between_folds_is_built_from_that_points_weights(tmp_path):
    # folds at steps 1 and 3, a point at step 4 (between folds): BEMA's last update is the point's own weights
    walk = trajectory(4, seed=4)
    settings = BEMASettings()
    store = new_store(tmp_path, bema=settings, windows=False)
    for step in (1, 3):
        store.fold([walk[step - 1][n].float() for n in store.names], ONE, step)
    store.cut(4, walk[3])
    store.wait()
    theta0, ema = walk[0], dict(walk[0])
    for step in (3, 4):  # the fold after the first, then the point's update
        beta = settings.ema_weight(step)
        ema = {n: (1 - beta) * ema[n] + beta * walk[step - 1][n] for n in SHAPES}
    alpha = settings.correction(4)
    expected = {n: ema[n] + alpha * (walk[3][n] - theta0[n]) for n in SHAPES}
    assert relative(StoreReader(tmp_path).bema(), expected) < 1e-6
