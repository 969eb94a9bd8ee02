"""Run under `accelerate launch` with 2 CPU processes; checks BN recompute and placement inside a real gloo group.

Writes a JSON report to argv[1] from rank 0; exits non-zero on any failed check.
"""

import json
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from swa_accel import MainProcessPlacement, WeightAverager  # noqa: E402
from swa_accel.batchnorm import bn_order, recompute_bn, shard_loader  # noqa: E402
from swa_accel.runner.config import RunArguments  # noqa: E402
from swa_accel.runner.launch import end_process, make_accelerator  # noqa: E402


class DictDataset(torch.utils.data.Dataset):
    """42 samples (11 batches of 4, the last of 2) with a per-sample shift, so per-batch statistics really differ between batches."""

    def __init__(self, n=42):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 6, 6, generator=generator) * 2 + torch.arange(n).view(n, 1, 1, 1) * 0.1
        self.y = torch.randint(0, 4, (n,), generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(5 * 16, 6), nn.BatchNorm1d(6), nn.Linear(6, 4))

    def forward(self, pixel_values):
        return self.head(self.body(pixel_values))


def bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def main():
    report_path = Path(sys.argv[1])
    accelerator = make_accelerator(RunArguments(output_dir=str(report_path.parent / "acc")))
    world, rank = accelerator.num_processes, accelerator.process_index
    dataset = DictDataset()
    report = {"num_processes": world}

    for cap in (None, 18):
        net = Net()
        # The full pass reads the data in order; the capped one a seeded permutation, as the loop does.
        order = None if cap is None else bn_order(len(dataset), seed=0, pass_id=5)
        local_batches = len(list(shard_loader(dataset, 4, None, world, rank, order=order, max_samples=cap)))
        total = recompute_bn(net, lambda: shard_loader(dataset, 4, None, world, rank, order=order, max_samples=cap),
                             accelerator.device, world)
        reference = Net()
        rows = [(dataset[i]["pixel_values"], dataset[i]["labels"]) for i in (order or range(len(dataset)))]
        loader = DataLoader(rows, batch_size=4)
        if cap is not None:
            loader = [b for i, b in enumerate(loader) if i < math.ceil(cap / 4)]
        update_bn(loader, reference)
        ours, theirs = bn_state(net), bn_state(reference)
        worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)
        gathered = accelerator.gather(torch.tensor([float(local_batches)])).tolist()
        report[f"cap_{cap}"] = {"total_batches": total, "max_abs_diff": worst, "local_batches_per_rank": gathered}

    # Placement: only rank 0 keeps the average; materialize broadcasts it to every rank.
    model = accelerator.prepare(Net())
    averager = WeightAverager(model, "swa", MainProcessPlacement(accelerator.device), rank)
    with torch.no_grad():
        for step in range(3):
            for p in model.parameters():
                p.add_(0.01 * (step + 1))
            averager.update(model)
    module = averager.placement.materialize(averager, Net, accelerator.unwrap_model(model), world)
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    everyone = accelerator.gather(flat.unsqueeze(0))
    holds = accelerator.gather(torch.tensor([1.0 if averager.averaged is not None else 0.0])).tolist()
    report["holds_copy_per_rank"] = holds
    report["materialized_equal_across_ranks"] = bool(torch.equal(everyone[0], everyone[-1]))
    if averager.averaged is not None:
        expected = torch.cat([averager.averaged[n].flatten() for n, _ in module.named_parameters()])
        report["materialized_equals_average"] = bool(torch.equal(flat, expected))
    if accelerator.is_main_process:
        report_path.write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tears the gloo group down before exit
    end_process(0)  # every check is done and the report written: leave past gloo's teardown (see its docstring)


if __name__ == "__main__":
    main()
