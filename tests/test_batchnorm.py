"""BN recompute: equals torch's update_bn in one process, and across a real 2-process gloo group."""

import json

import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from swa_accel.batchnorm import bn_order, recompute_bn, shard_batches, shard_loader
from tests.helpers.launch import ROOT, launch

CPU = torch.device("cpu")


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 2),
                         nn.BatchNorm1d(2))


def data(n=30):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 6, 6, generator=generator) + torch.linspace(0, 3, n).view(n, 1, 1, 1)
    return x, torch.randint(0, 2, (n,), generator=generator)


def running(module):
    return [t.clone() for k, t in module.state_dict().items() if "running" in k or "num_batches" in k]


def test_tuple_batches_match_update_bn_and_momentum_is_restored():
    x, y = data()
    dataset = TensorDataset(x, y)
    net, reference = bn_net(), bn_net()
    net[1].momentum = 0.3
    total = recompute_bn(net, lambda: shard_loader(dataset, 4, None, 1, 0), CPU)
    reference[1].momentum = 0.3
    update_bn(DataLoader(dataset, batch_size=4), reference)
    assert total == 8
    for ours, theirs in zip(running(net), running(reference)):
        torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-5, rtol=0)
    assert net[1].momentum == 0.3 and net.training


def test_dict_batches_and_a_sample_cap():
    x, y = data()

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"pixel_values": x[i], "labels": y[i]}

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = bn_net()

        def forward(self, pixel_values):
            return self.net(pixel_values)

    ours, reference = Named(), bn_net()
    # A cap of 10 samples keeps whole batches: ceil(10 / 4) = 3 of them.
    total = recompute_bn(ours, lambda: shard_loader(Dicts(), 4, None, 1, 0, max_samples=10), CPU)
    update_bn([b for i, b in enumerate(DataLoader(TensorDataset(x, y), batch_size=4)) if i < 3], reference)
    assert total == 3
    for mine, theirs in zip(running(ours.net), running(reference)):
        torch.testing.assert_close(mine.float(), theirs.float(), atol=1e-5, rtol=0)
    # The statistics really changed from the reset values, so the comparison above is not vacuous.
    assert ours.net[1].running_mean.abs().max() > 0.1


def test_a_seeded_order_is_a_permutation_and_capped_passes_read_random_samples():
    order = bn_order(100, seed=3, pass_id=7)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert bn_order(100, seed=3, pass_id=7) == order  # the same on every rank
    assert bn_order(100, seed=3, pass_id=8) != order  # a new draw each pass
    # 2 ranks, batches of 8, capped at 20 samples: 3 global batches, dealt round-robin, the rest unread.
    rank0, rank1 = (shard_batches(order, 8, 2, rank, max_samples=20) for rank in (0, 1))
    assert rank0 == [order[0:8], order[16:24]] and rank1 == [order[8:16]]
    assert len(shard_batches(order, 8, 2, 0)) + len(shard_batches(order, 8, 2, 1)) == 13


def test_model_without_batchnorm_reads_no_data():
    calls = []

    def factory():
        calls.append(1)
        raise AssertionError("the BN pass must not build a loader for a model without BN")

    net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    assert recompute_bn(net, factory, CPU) == 0
    assert calls == []


def test_two_processes_over_uneven_shards_match_one_process_update_bn(tmp_path):
    report_path = tmp_path / "report.json"
    launch(ROOT / "tests" / "workers" / "bn_and_placement.py", [str(report_path)], num_processes=2)
    report = json.loads(report_path.read_text())
    assert report["num_processes"] == 2
    full = report["cap_None"]
    # 42 samples in batches of 4: 11 batches, the last one short, dealt 6 / 5 with no padding.
    assert full["total_batches"] == 11 and full["local_batches_per_rank"] == [6.0, 5.0]
    assert full["max_abs_diff"] < 1e-5
    capped = report["cap_18"]
    # A cap of 18 samples over a seeded permutation: 5 batches of 4, rank 0 runs 3, rank 1 runs 2 (uneven),
    # nobody hangs, and the result is update_bn over the same 5 permuted batches.
    assert capped["total_batches"] == 5 and capped["max_abs_diff"] < 1e-5
    assert capped["local_batches_per_rank"] == [3.0, 2.0]
    assert report["holds_copy_per_rank"] == [1.0, 0.0]
    assert report["materialized_equal_across_ranks"] and report["materialized_equals_average"]
