"""The averaged weights: arithmetic mean / EMA recurrence, AveragedModel parity, fp32 copy, wrappers."""

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from swa_accel import MainProcessPlacement, WeightAverager
from swa_accel.averaging import clean_name, named_tensors

CPU = torch.device("cpu")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def trajectory(model: nn.Module, steps: int, seed: int = 1):
    """Yields after each of `steps` SGD steps on random data, so snapshots really differ."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=generator).to(next(model.parameters()).dtype)
        y = torch.randint(0, 3, (8,), generator=generator)
        loss = nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield


def make_averager(model, method="swa", **kwargs):
    return WeightAverager(model, method, MainProcessPlacement(CPU), process_index=0, **kwargs)


def test_swa_is_the_arithmetic_mean_of_snapshots():
    model = small_net()
    averager = make_averager(model)
    snapshots = []
    for _ in trajectory(model, 7):
        averager.update(model)
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert averager.n_averaged == 7
    for name in snapshots[0]:
        expected = torch.stack([s[name] for s in snapshots]).mean(dim=0)
        torch.testing.assert_close(averager.averaged[name], expected, atol=1e-6, rtol=0)
    # The average must differ from the last iterate, or the test above could pass vacuously.
    assert not torch.allclose(averager.averaged["4.weight"], snapshots[-1]["4.weight"])


def test_ema_follows_the_recurrence_with_and_without_warmup():
    for warmup in (False, True):
        model = small_net()
        averager = make_averager(model, "ema", ema_decay=0.9, ema_warmup=warmup, ema_buffers="copy")
        expected = None
        for n, _ in enumerate(trajectory(model, 6)):
            averager.update(model)
            current = {k: p.detach().clone() for k, p in model.named_parameters()}
            if expected is None:
                expected = current
            else:
                decay = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
                expected = {k: decay * expected[k] + (1 - decay) * current[k] for k in current}
        for name, value in expected.items():
            torch.testing.assert_close(averager.averaged[name], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["swa", "ema"])
def test_matches_torch_averaged_model_on_the_same_trajectory(method):
    model = small_net()
    averager = make_averager(model, method, ema_decay=0.95, ema_buffers="average")
    if method == "swa":
        reference = AveragedModel(model)
    else:
        reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.95), use_buffers=True)
    for _ in trajectory(model, 5):
        averager.update(model)
        reference.update_parameters(model)
    ref_tensors = named_tensors(reference.module, buffers=(method == "ema"))
    assert set(ref_tensors) == set(averager.averaged)
    for name, value in ref_tensors.items():
        torch.testing.assert_close(averager.averaged[name], value.float(), atol=1e-6, rtol=0)


def test_bf16_model_keeps_an_fp32_average_that_still_moves():
    model = small_net().to(torch.bfloat16)
    averager = make_averager(model)
    reference = AveragedModel(model)
    snapshots = []
    for _ in trajectory(model, 40):
        averager.update(model)
        reference.update_parameters(model)
        snapshots.append(model[4].weight.detach().float().clone())
    ours = averager.averaged["4.weight"]
    assert ours.dtype == torch.float32
    exact = torch.stack(snapshots).mean(dim=0)
    torch.testing.assert_close(ours, exact, atol=1e-6, rtol=0)
    # torch's bf16 average rounds every update; ours is closer to the exact mean of the bf16 snapshots.
    ref_error = (reference.module[4].weight.float() - exact).abs().max()
    assert (ours - exact).abs().max() < ref_error


class Wrapper(nn.Module):
    """Stands in for DDP (`module.`) and torch.compile (`_orig_mod.`): same parameters, prefixed names."""

    def __init__(self, inner: nn.Module, attribute: str) -> None:
        super().__init__()
        setattr(self, attribute, inner)
        self.attribute = attribute

    def forward(self, x):
        return getattr(self, self.attribute)(x)


def test_wrapper_prefixes_never_leak_and_never_freeze_the_average():
    inner = small_net()
    wrapped = Wrapper(Wrapper(inner, "_orig_mod"), "module")
    assert any(n.startswith("module._orig_mod.") for n, _ in wrapped.named_parameters())
    averager = make_averager(wrapped)
    assert set(averager.averaged) == {n for n, _ in inner.named_parameters()}
    first = None
    for i, _ in enumerate(trajectory(inner, 3)):
        averager.update(wrapped)
        if i == 0:
            first = averager.averaged["4.weight"].clone()
    assert not torch.equal(first, averager.averaged["4.weight"])  # updates went through the wrapper
    # An averager bound to the plain model still updates when handed the wrapped one later.
    plain = make_averager(inner)
    plain.update(inner)
    plain.update(wrapped)
    assert plain.n_averaged == 2
    assert clean_name("module._orig_mod.layer.0.weight") == "layer.0.weight"
    assert clean_name("encoder._orig_mod.weight") == "encoder.weight"


def test_mismatched_model_is_refused_instead_of_silently_skipped():
    averager = make_averager(small_net())
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="differ"):
        averager.update(other)


def test_non_main_rank_holds_no_copy_but_counts_updates():
    model = small_net()
    averager = WeightAverager(model, "swa", MainProcessPlacement(CPU), process_index=1)
    assert averager.averaged is None
    averager.update(model)
    assert averager.n_averaged == 1
    state = averager.state_dict()
    assert state["averaged"] is None and state["n_averaged"] == 1


def test_state_dict_round_trip_and_materialize():
    model = small_net()
    averager = make_averager(model)
    for _ in trajectory(model, 3):
        averager.update(model)
    restored = make_averager(small_net())
    restored.load_state_dict(averager.state_dict())
    assert restored.n_averaged == 3
    for name, value in averager.averaged.items():
        assert torch.equal(restored.averaged[name], value)
    module = averager.placement.materialize(averager, small_net, model, num_processes=1)
    assert module[4].weight.dtype == torch.float32
    assert torch.equal(module[4].weight, averager.averaged["4.weight"])
    with pytest.raises(ValueError, match="swa_method"):
        make_averager(small_net(), "ema").load_state_dict(averager.state_dict())


def test_offload_to_cpu_placement_keeps_the_copy_on_cpu():
    placement = MainProcessPlacement(torch.device("cpu"), offload_to_cpu=True)
    averager = WeightAverager(small_net(), "swa", placement, process_index=0)
    assert all(t.device.type == "cpu" for t in averager.averaged.values())
