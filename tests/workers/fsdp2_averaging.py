"""Run under `accelerate launch` with 2 CPU processes: the sharded (FSDP2) average against a full-model reference.

Plain torch `fully_shard` over a CPU device mesh runs on gloo (accelerate enables FSDP only with GPUs).
One training run of 6 SGD steps, averaged after each step; after step 4 a checkpoint and a swap-in
(BN recompute, evaluation, export), after step 6 the final export; then a fresh model and averager
resume from the step-4 checkpoint and take steps 5 and 6 again. Rank 0 writes a JSON report to
argv[1]; tests/test_sharded_placement.py asserts on it.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from swa_accel import WeightAverager  # noqa: E402
from swa_accel.batchnorm import shard_loader  # noqa: E402
from swa_accel.runner.config import RunArguments  # noqa: E402
from swa_accel.runner.launch import end_process, make_accelerator  # noqa: E402
from swa_accel.sharded import (  # noqa: E402
    ShardedPlacement,
    averaged_bytes,
    gather_full_state,
    local_shard,
    recompute_bn_sharded,
    swapped_in,
)
from swa_accel.sharded_checkpoints import register_shard_checkpointing  # noqa: E402

STEPS, CHECKPOINT_STEP = 6, 4


class BNDataset(torch.utils.data.Dataset):
    """42 samples, 11 batches of 4 (the last of 2): dealt 6 / 5 to 2 ranks, so the BN pass is uneven."""

    def __init__(self, n=42):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 6, 6, generator=generator) * 2 + torch.arange(n).view(n, 1, 1, 1) * 0.1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i]}


class Net(nn.Module):
    """Conv + BN, then Linear(80, 5) (dim 0 of 5: shards of 3 and 2) and Linear(5, 1) (rank 1's shard is empty).

    Flatten opens the head, not the body: an FSDP unit that returns a view makes FSDP2 warn.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 16, 5), nn.ReLU(), nn.Linear(5, 1))

    def forward(self, pixel_values):
        return self.head(self.body(pixel_values))


def sharded_net(mesh, freeze_body=False):
    net = Net()
    if freeze_body:  # (as under PEFT: the frozen part is sharded too, and only the head trains)
        net.body.requires_grad_(False)
    # Two FSDP units: the body, and the root holding the head (the root stays unsharded after a forward).
    fully_shard(net.body, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def train_step(model, optimizer, step, rank):
    """One SGD step on this rank's own seeded batch (FSDP reduce-scatters the gradients)."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 3, 6, 6, generator=generator) + 0.3 * step
    y = torch.randn(8, 1, generator=generator)
    F.mse_loss(model(pixel_values=x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def full_params(model):
    """Every parameter gathered in full (a collective): the reference's view of the trajectory."""
    return {n: p.full_tensor() if isinstance(p, DTensor) else p.detach().clone() for n, p in model.named_parameters()}


def local_state(model):
    """Clones of this rank's shards and buffers: what a swap must leave bit-identical."""
    state = {n: local_shard(p).clone() for n, p in model.named_parameters()}
    state.update({n: b.clone() for n, b in model.named_buffers()})
    return state


def bn_stats(state):
    return {k: v for k, v in state.items() if "running" in k or "num_batches" in k}


def max_diff(ours, reference):
    return max((ours[k].double() - reference[k].double()).abs().max().item() for k in reference)


def all_ranks(value):
    """`value` from every rank, in rank order (every rank calls it)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def reference_bn(mean, dataset):
    """torch's update_bn in one process, over all BN batches, on an unsharded copy holding the average."""
    net = Net()
    net.load_state_dict({k: v.float() for k, v in mean.items()}, strict=False)
    update_bn(DataLoader(dataset.x, batch_size=4), net)
    return net


def main():
    report_path = Path(sys.argv[1])
    accelerator = make_accelerator(RunArguments(output_dir=str(report_path.parent / "acc")))
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    mesh = init_device_mesh("cpu", (world,))
    bn_data = BNDataset()
    eval_x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    checkpoint_dir = report_path.parent / "checkpoint"
    report = {"num_processes": world}

    def bn_loader():
        return shard_loader(bn_data, 4, None, world, rank)

    model = sharded_net(mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    # Built before the first forward, as a loop builds it: FSDP's lazy init must not move the shards.
    averager = WeightAverager(model, "swa", ShardedPlacement(device), rank)
    hooks = register_shard_checkpointing(accelerator, averager)
    storage_before = {n: local_shard(p).data_ptr() for n, p in model.named_parameters()}
    local_numel = sum(local_shard(p).numel() for p in model.parameters())
    report["local_shapes"] = all_ranks({n: list(local_shard(p).shape) for n, p in model.named_parameters()})
    report["full_shapes"] = {n: list(p.shape) for n, p in model.named_parameters()}
    report["averaged_bytes"] = all_ranks(averaged_bytes(averager))
    report["local_numel"] = all_ranks(local_numel)
    report["full_numel"] = sum(p.numel() for p in model.parameters())
    report["holds_copy"] = all_ranks(averager.averaged is not None)

    reference_sum = None
    for step in range(1, STEPS + 1):
        train_step(model, optimizer, step, rank)
        averager.update(model)
        full = full_params(model)
        if rank == 0:
            reference_sum = {k: v.double() for k, v in full.items()} if reference_sum is None else \
                {k: reference_sum[k] + full[k].double() for k in full}
        mean = {k: v / step for k, v in reference_sum.items()} if rank == 0 else None
        if step == CHECKPOINT_STEP:
            accelerator.save_state(str(checkpoint_dir))  # the hooks write one shard file per rank
            accelerator.wait_for_everyone()  # save_state returns without a barrier; rank 0 lists every rank's files
            saved_average = {k: v.clone() for k, v in averager.averaged.items()}
            training_at_checkpoint = local_state(model)
            report["checkpoint_files"] = sorted(p.name for p in checkpoint_dir.iterdir())
            report["mid"] = check_swap(averager, model, mean, rank, world, device, bn_loader, bn_data, eval_x)
    report["storage_unchanged"] = all_ranks(
        all(local_shard(p).data_ptr() == storage_before[n] for n, p in model.named_parameters()))

    with swapped_in(averager, model):
        recompute_bn_sharded(model, bn_loader, device, world)
        final_export = gather_full_state(averager, model, rank)
    if rank == 0:
        report["final_export_vs_reference"] = max_diff(final_export, mean)
        report["final_export_keys"] = sorted(final_export)
    final_average = {k: v.clone() for k, v in averager.averaged.items()}
    final_training = local_state(model)

    # Resume: a fresh sharded model with the step-4 training state and a fresh averager loaded from the shard files.
    for handle in hooks:
        handle.remove()
    resumed = sharded_net(mesh)
    with torch.no_grad():
        for name, tensor in {**{n: local_shard(p) for n, p in resumed.named_parameters()},
                             **dict(resumed.named_buffers())}.items():
            tensor.copy_(training_at_checkpoint[name])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.05)
    resumed_averager = WeightAverager(resumed, "swa", ShardedPlacement(device), rank)
    hooks = register_shard_checkpointing(accelerator, resumed_averager)
    accelerator.load_state(str(checkpoint_dir))
    for handle in hooks:
        handle.remove()
    report["restored_bit_identical"] = all_ranks(
        resumed_averager.n_averaged == CHECKPOINT_STEP
        and all(torch.equal(resumed_averager.averaged[k], v) for k, v in saved_average.items()))
    for step in range(CHECKPOINT_STEP + 1, STEPS + 1):
        train_step(resumed, resumed_optimizer, step, rank)
        resumed_averager.update(resumed)
    report["resumed_average_equal"] = all_ranks(
        all(torch.equal(resumed_averager.averaged[k], v) for k, v in final_average.items()))
    report["resumed_training_equal"] = all_ranks(
        all(torch.equal(v, final_training[k]) for k, v in local_state(resumed).items() if "num_batches" not in k))

    report["accelerate_custom_state"] = probe_accelerate_custom_state(accelerator, report_path.parent / "probe", rank)
    report["trainable_only"] = check_trainable_only(mesh, device, rank)
    report["store_only"] = check_store_only(accelerator, mesh, bn_data, report_path.parent / "store_only", rank)
    if rank == 0:
        report_path.write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tears the gloo group down before exit
    end_process(0)  # every check is done and the report written: leave past gloo's teardown (see its docstring)


def check_swap(averager, model, mean, rank, world, device, bn_loader, bn_data, eval_x):
    """Swap in, check what the sharded model holds, recompute BN, evaluate, export; then check the swap-out."""
    result = {}
    before = local_state(model)
    with swapped_in(averager, model):
        inside = full_params(model)
        bn_batches = all_ranks(len(bn_loader()))
        total = recompute_bn_sharded(model, bn_loader, device, world)
        buffers = bn_stats({n: b.clone() for n, b in model.named_buffers()})
        export = gather_full_state(averager, model, rank)
        # Evaluation last: the forward leaves the root's parameters unsharded, holding the average, so the
        # training steps after the swap show whether swapping out really drops them.
        with torch.no_grad():
            model.eval()
            logits = model(pixel_values=eval_x)
            model.train()
    after = local_state(model)
    result["restored_bit_identical"] = all_ranks(all(torch.equal(after[k], v) for k, v in before.items()))
    result["bn_buffers_changed_inside"] = all_ranks(any(not torch.equal(v, before[k]) for k, v in buffers.items()))
    everyone = all_ranks(buffers)
    result["bn_equal_across_ranks"] = all(torch.equal(other[k], v)
                                          for other in everyone for k, v in everyone[0].items())
    result["bn_batches_per_rank"], result["bn_total_batches"] = bn_batches, total
    if rank == 0:
        reference = reference_bn(mean, bn_data)
        reference_state = reference.state_dict()
        result["inside_vs_reference"] = max_diff(inside, mean)
        result["bn_vs_update_bn"] = max_diff(buffers, bn_stats(reference_state))
        result["bn_stats_magnitude"] = max(v.abs().max().item() for k, v in buffers.items() if "running_mean" in k)
        result["export_vs_reference"] = max_diff(export, mean)
        result["export_bn_vs_update_bn"] = max_diff(bn_stats(export), bn_stats(reference_state))
        result["export_keys"] = sorted(export)
        with torch.no_grad():
            result["eval_vs_unsharded"] = (logits - reference.eval()(eval_x)).abs().max().item()
    result["export_is_none_per_rank"] = all_ranks(export is None)
    return result


def check_trainable_only(mesh, device, rank):
    """`average_trainable_only` under FSDP2: a model whose body is frozen averages only its head's shards; the
    export holds the head's average and the body's own (untouched) weights."""
    result = {}
    model = sharded_net(mesh, freeze_body=True)
    frozen_before = {n: v for n, v in full_params(model).items() if n.startswith("body.")}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    averager = WeightAverager(model, "swa", ShardedPlacement(device, trainable_only=True), rank)
    head_numel = sum(local_shard(p).numel() for n, p in model.named_parameters() if n.startswith("head."))
    reference_sum = None
    for step in range(1, 4):
        train_step(model, optimizer, step, rank)
        averager.update(model)
        full = {k: v.double() for k, v in full_params(model).items() if k.startswith("head.")}
        reference_sum = full if reference_sum is None else {k: reference_sum[k] + v for k, v in full.items()}
    result["averaged_names"] = all_ranks(sorted(averager.averaged))
    result["averaged_numel_is_head_shards"] = all_ranks(
        sum(t.numel() for t in averager.averaged.values()) == head_numel)
    before = local_state(model)
    with swapped_in(averager, model):
        export = gather_full_state(averager, model, rank)
    after = local_state(model)
    result["restored_bit_identical"] = all_ranks(all(torch.equal(after[k], v) for k, v in before.items()))
    if rank == 0:
        mean = {k: v / 3 for k, v in reference_sum.items()}
        result["head_vs_reference"] = max_diff(export, mean)
        result["head_moved"] = max_diff(mean, {k: v.double() for k, v in full_params_at_init().items()
                                               if k.startswith("head.")})
        result["body_equal_to_frozen"] = all(torch.equal(export[k], v) for k, v in frozen_before.items())
    return result


def check_store_only(accelerator, mesh, bn_data, folder, rank):
    """`SWA` with swa_method none and the snapshot store under FSDP2: the rate stays the optimizer's, each rank
    writes its own shards, and the store's windows (gathered) are the float64 means of the full weights at the epoch
    ends they cover."""
    from swa_accel import SWA, SWAArguments

    model = sharded_net(mesh)
    optimizer, loader = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.05),
                                            DataLoader(bn_data, batch_size=4))
    args = SWAArguments(swa_method="none", snapshot_every="every_epoch", swa_start_candidates="every_epoch",
                        swa_placement="sharded", lawa_ks="1")
    swa = SWA(accelerator, model, optimizer, loader, args, num_epochs=3, build_model=Net, register=False,
              verbose=False, store_dir=folder)
    steps_per_epoch, epoch_ends = swa.plan.steps_per_epoch, []
    for step in range(1, 3 * steps_per_epoch + 1):
        train_step(model, optimizer, step, rank)
        swa.step()
        full = full_params(model)  # (every rank: a collective)
        if step % steps_per_epoch == 0:
            epoch_ends.append({k: v.double() for k, v in full.items()})
    result = {"store_only": swa.store_only, "rates": [g["lr"] for g in optimizer.param_groups],
              "placement": swa.placement.name, "candidates": swa.averager.candidate_names()}
    swa.averager.store.wait()
    result["files"] = all_ranks(sorted(p.name for p in folder.glob(f"*.rank{rank}.safetensors")))
    result["vs_reference"] = {}
    for name, first in (("swa_from_epoch_0", 0), ("swa_from_epoch_1", 1), ("lawa_last_1", 2)):
        with swapped_in(swa.averager, model, name):
            built = gather_full_state(swa.averager, model, rank)
        if rank == 0:
            mean = {k: torch.stack([weights[k] for weights in epoch_ends[first:]]).mean(0) for k in epoch_ends[0]}
            result["vs_reference"][name] = max_diff(built, mean)
    return result


def full_params_at_init():
    return {n: p.detach() for n, p in Net().named_parameters()}


class Probe:
    """A custom object holding its rank: shows what accelerate's register_for_checkpointing saves and loads."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def probe_accelerate_custom_state(accelerator, folder, rank):
    """accelerate 1.15 saves custom objects from the main process only, and every rank loads that one file."""
    probe = Probe(rank)
    accelerator.register_for_checkpointing(probe)
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()  # rank 0 may still be writing the file every rank then loads
    files = sorted(p.name for p in folder.iterdir() if p.name.startswith("custom_checkpoint"))
    probe.value = -1
    accelerator.load_state(str(folder))
    return {"files": files, "loaded_per_rank": all_ranks(probe.value)}


if __name__ == "__main__":
    main()
