"""Sharded placement (FSDP2): each rank averages its own shards; swap-in, BN recompute, export and resume.

The first tests check the swap's bookkeeping on plain modules in one process (no DTensor, no group);
the rest assert on one real 2-process gloo run of `fully_shard` (tests/workers/fsdp2_averaging.py).
"""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from swa_accel import MainProcessPlacement, WeightAverager
from swa_accel.sharded import ShardedPlacement, averaged_bytes, gather_full_state, swapped_in
from swa_accel.sharded_checkpoints import load_shards, register_shard_checkpointing, save_shards
from tests.helpers.launch import ROOT, launch

CPU = torch.device("cpu")


def bn_net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).to(dtype)


def inputs(dtype=torch.float32, seed=0):
    return torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(seed)).to(dtype) + 1.0


def trained_averager(net, method="swa", steps=3, **kwargs):
    """An averager over a few moves of `net`'s weights, with train-mode forwards moving its BN statistics."""
    averager = WeightAverager(net, method, ShardedPlacement(CPU), 0, **kwargs)
    dtype = next(net.parameters()).dtype
    with torch.no_grad():
        for step in range(steps):
            for p in net.parameters():
                p.add_(0.05 * (step + 1))
            net(inputs(dtype, seed=step))
            averager.update(net)
    return averager


def snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_bit_identical(net, before):
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_low_precision_weights_keep_the_fp32_average_through_a_swap():
    net = bn_net(torch.bfloat16)
    averager = trained_averager(net)
    average = {k: v.clone() for k, v in averager.averaged.items()}
    before = snapshot(net)
    with swapped_in(averager, net):
        for name, p in net.named_parameters():
            assert torch.equal(p, average[name].to(torch.bfloat16)), name
        net(inputs(torch.bfloat16, seed=9))  # a BN pass changes the buffers
        assert not torch.equal(net[1].running_mean, before["1.running_mean"])
        export = gather_full_state(averager, net, 0)
    assert_bit_identical(net, before)
    # A bf16 parameter cannot hold the fp32 average, so the average stayed where it was, untouched.
    for name, value in average.items():
        assert torch.equal(averager.averaged[name], value)
        assert export[name].dtype == torch.float32 and torch.equal(export[name], value)
    assert export["1.num_batches_tracked"].item() == before["1.num_batches_tracked"].item() + 1


def test_fp32_swap_exchanges_contents_and_restores_them_after_an_error():
    net = bn_net()
    averager = trained_averager(net)
    average = {k: v.clone() for k, v in averager.averaged.items()}
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with swapped_in(averager, net):
            for name, p in net.named_parameters():
                assert torch.equal(p, average[name])
                # Exchanged, not copied: the averaged copy holds the training weights meanwhile (no extra memory).
                assert torch.equal(averager.averaged[name], before[name])
            net(inputs(seed=9))
            raise RuntimeError("evaluation failed")
    assert_bit_identical(net, before)
    for name, value in average.items():
        assert torch.equal(averager.averaged[name], value)
    assert averager.placement.active_swap is None
    with swapped_in(averager, net):  # usable again
        pass
    assert_bit_identical(net, before)


def test_ema_averaged_buffers_are_swapped_in_and_restored():
    net = bn_net()
    averager = trained_averager(net, method="ema", ema_decay=0.5, ema_buffers="average")
    assert "1.running_mean" in averager.averaged
    before = snapshot(net)
    with swapped_in(averager, net):
        assert torch.equal(net[1].running_mean, averager.averaged["1.running_mean"])
        assert not torch.equal(net[1].running_mean, before["1.running_mean"])
    assert_bit_identical(net, before)


def test_a_candidate_is_swapped_in_and_left_as_it_was():
    net = bn_net()
    averager = WeightAverager(net, "swa", ShardedPlacement(CPU), 0, ema_decays=(0.5,))
    with torch.no_grad():
        for step in range(4):
            if step == 2:
                averager.start_candidate("late")
            for p in net.parameters():
                p.add_(0.05 * (step + 1))
            averager.update(net)
    before = snapshot(net)
    for name in ("late", "ema_0.5"):
        expected = {k: v.clone() for k, v in averager.candidate_tensors(name).items()}
        with swapped_in(averager, net, candidate=name):
            for key, p in net.named_parameters():
                assert torch.equal(p, expected[key]), (name, key)
            export = gather_full_state(averager, net, 0)
        assert all(torch.equal(export[k], v) for k, v in expected.items())
        assert all(torch.equal(averager.candidate_tensors(name)[k], v) for k, v in expected.items())
        assert_bit_identical(net, before)


def test_misuse_is_refused_with_a_clear_error():
    net = bn_net()
    empty = WeightAverager(net, "swa", ShardedPlacement(CPU), 0)
    with pytest.raises(ValueError, match="no update"):
        with swapped_in(empty, net):
            pass
    averager = trained_averager(net)
    with pytest.raises(RuntimeError, match="inside swapped_in"):
        gather_full_state(averager, net, 0)
    with swapped_in(averager, net):
        with pytest.raises(RuntimeError, match="already swapped"):
            with swapped_in(averager, net):
                pass
        with pytest.raises(RuntimeError, match="after swapped_in exits"):
            save_shards(averager, ".", 0, 1)
    main = WeightAverager(net, "swa", MainProcessPlacement(CPU), 0)
    main.update(net)
    with pytest.raises(TypeError, match="ShardedPlacement"):
        with swapped_in(main, net):
            pass


def test_a_model_whose_shards_were_replaced_after_binding_is_refused():
    net = bn_net()
    averager = trained_averager(net)
    net[4].weight = nn.Parameter(net[4].weight.detach().clone())  # updates would no longer reach the average
    with pytest.raises(RuntimeError, match="storage of '4.weight' changed"):
        with swapped_in(averager, net):
            pass


def test_shard_files_resume_only_on_the_same_number_of_processes(tmp_path):
    net = bn_net()
    averager = trained_averager(net)
    assert averaged_bytes(averager) == 4 * sum(p.numel() for p in net.parameters())
    path = save_shards(averager, tmp_path, 1, 2)
    assert path.name == "swa_average_rank00001_of_00002.pt"
    fresh = WeightAverager(bn_net(), "swa", ShardedPlacement(CPU), 1)
    load_shards(fresh, tmp_path, 1, 2)
    assert fresh.n_averaged == 3
    assert all(torch.equal(fresh.averaged[k], v) for k, v in averager.averaged.items())
    with pytest.raises(ValueError, match="shards of 2 processes, this run has 4"):
        load_shards(fresh, tmp_path, 1, 4)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(ValueError, match="shards differ"):
        load_shards(WeightAverager(other, "swa", ShardedPlacement(CPU), 1), tmp_path, 1, 2)


def test_an_averager_also_registered_with_accelerate_is_refused():
    averager = trained_averager(bn_net())
    hooks = []
    accelerator = SimpleNamespace(process_index=0, num_processes=2, _custom_objects=[averager],
                                  register_save_state_pre_hook=hooks.append, register_load_state_pre_hook=hooks.append)
    with pytest.raises(RuntimeError, match="register_for_checkpointing"):
        register_shard_checkpointing(accelerator, averager)
    assert hooks == []


# ----- one real 2-process FSDP2 run -------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2")
    launch(ROOT / "tests" / "workers" / "fsdp2_averaging.py", [str(folder / "report.json")], num_processes=2,
           timeout=180)
    result = json.loads((folder / "report.json").read_text())
    assert result["num_processes"] == 2
    return result


def test_each_rank_holds_only_its_own_uneven_shards(report):
    rank0, rank1 = report["local_shapes"]
    for name, full in report["full_shapes"].items():
        expected = [list(c.shape) for c in torch.chunk(torch.empty(full), 2)]
        expected += [[0, *full[1:]]] * (2 - len(expected))  # torch.chunk gives fewer chunks than ranks for size 1
        assert [rank0[name], rank1[name]] == expected, name
    assert [rank0["head.1.weight"], rank1["head.1.weight"]] == [[3, 80], [2, 80]]
    assert [rank0["head.3.weight"], rank1["head.3.weight"]] == [[1, 5], [0, 5]]
    assert report["holds_copy"] == [True, True]
    assert report["averaged_bytes"] == [4 * n for n in report["local_numel"]]
    assert all(b < 4 * report["full_numel"] for b in report["averaged_bytes"])
    assert sum(report["local_numel"]) == report["full_numel"]  # the shards partition the model
    # The optimizer updated the shards in place: the averager's bound storage is still the model's.
    assert report["storage_unchanged"] == [True, True]


def test_sharded_average_equals_a_float64_full_model_reference(report):
    mid = report["mid"]
    assert mid["inside_vs_reference"] < 1e-6  # the swapped-in model's full parameters after 4 updates
    assert mid["export_vs_reference"] < 1e-6
    assert report["final_export_vs_reference"] < 1e-6  # after 6 updates
    names = set(report["full_shapes"]) | {"body.1.running_mean", "body.1.running_var", "body.1.num_batches_tracked"}
    assert set(mid["export_keys"]) == names and set(report["final_export_keys"]) == names


def test_swap_is_bit_identical_and_sharded_bn_recompute_matches_update_bn(report):
    mid = report["mid"]
    assert mid["restored_bit_identical"] == [True, True]  # training shards and BN buffers, on each rank
    assert mid["bn_buffers_changed_inside"] == [True, True]
    # 11 BN batches dealt 6 / 5: the rank with fewer ran a padding forward, and nobody hung.
    assert mid["bn_batches_per_rank"] == [6, 5] and mid["bn_total_batches"] == 11
    assert mid["bn_equal_across_ranks"]
    assert mid["bn_vs_update_bn"] < 1e-5 and mid["bn_stats_magnitude"] > 0.1
    assert mid["export_bn_vs_update_bn"] < 1e-5
    assert mid["eval_vs_unsharded"] < 1e-5  # evaluation in the sharded model = the unsharded averaged model


def test_export_is_gathered_on_rank_0_only(report):
    assert report["mid"]["export_is_none_per_rank"] == [False, True]


def test_resume_from_per_rank_shard_files_continues_identically(report):
    assert {"swa_average_rank00000_of_00002.pt", "swa_average_rank00001_of_00002.pt"} <= set(
        report["checkpoint_files"])
    assert report["restored_bit_identical"] == [True, True]
    # 2 more steps after the restore give exactly the average (and weights) of the uninterrupted run,
    # which also swapped the average in and out at the checkpoint step.
    assert report["resumed_average_equal"] == [True, True]
    assert report["resumed_training_equal"] == [True, True]


def test_accelerate_custom_state_loads_rank_0s_state_on_every_rank(report):
    # Why the shards are not saved with register_for_checkpointing in accelerate 1.15: one file, rank 0's,
    # loaded by every rank.
    probe = report["accelerate_custom_state"]
    assert probe["files"] == ["custom_checkpoint_0.pkl"]
    assert probe["loaded_per_rank"] == [0, 0]


def test_only_the_trainable_shards_are_averaged_and_the_frozen_weights_exported_as_they_are(report):
    trainable = report["trainable_only"]
    head = ["head.1.bias", "head.1.weight", "head.3.bias", "head.3.weight"]
    assert trainable["averaged_names"] == [head, head]  # no frozen body weight, no BN buffer, on either rank
    assert trainable["averaged_numel_is_head_shards"] == [True, True]
    assert trainable["restored_bit_identical"] == [True, True]
    assert trainable["head_vs_reference"] < 1e-6 and trainable["head_moved"] > 1e-3
    assert trainable["body_equal_to_frozen"]


def test_a_run_without_swa_keeps_the_store_in_shards_and_its_windows_are_the_means(report):
    store_only = report["store_only"]
    assert store_only["store_only"] and store_only["placement"] == "sharded"
    assert store_only["rates"] == [0.05]  # the optimizer's own rate: no SWA phase
    names = store_only["candidates"]
    assert names[:3] == ["swa_from_epoch_0", "swa_from_epoch_1", "swa_from_epoch_2"] and "lawa_last_1" in names
    for rank, files in enumerate(store_only["files"]):  # each rank its own shards: a segment per point, the last
        # point's weights (LAWA over 1), the tracked post-hoc EMAs per point
        assert [f for f in files if f.startswith(("segment", "weights"))] == sorted(
            [f"segment-{i:05d}.rank{rank}.safetensors" for i in range(3)] + [f"weights-00002.rank{rank}.safetensors"])
        assert {f"power0-{i:05d}.rank{rank}.safetensors" for i in range(3)} <= set(files), rank
    # the whole run's epoch ends, the last two, the last one: each the float64 mean of the full weights there
    assert all(diff < 1e-6 for diff in store_only["vs_reference"].values()), store_only["vs_reference"]
    assert set(store_only["vs_reference"]) == {"swa_from_epoch_0", "swa_from_epoch_1", "lawa_last_1"}
