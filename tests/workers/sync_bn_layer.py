"""Run under `accelerate launch` with 2 CPU processes: `SyncedBatchNorm` in a real gloo group against nn.BatchNorm on
the concatenated batch, and the average's BN recompute on a model with synced layers.

Writes a JSON report of measured differences (relative to each tensor's scale) to argv[1] from rank 0 (the larger of both ranks' values); the test
asserts on them.
"""

import copy
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from swa_accel.batchnorm import batchnorm_layers, recompute_bn  # noqa: E402
from swa_accel.runner.sync_bn import convert_sync_batchnorm  # noqa: E402

#: Uneven shares of the global batch (5 and 11 samples), so that a plain mean of the ranks' means would be wrong.
SHARES = (5, 11)


def biggest(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference, relative to the larger of 1 and the expected tensor's largest magnitude."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def layer_against_plain(plain: nn.modules.batchnorm._BatchNorm, shape: tuple, rank: int) -> dict:
    """Two training steps of the synced layer on this rank's share against `plain` on the whole batch, then an
    evaluation forward, and a train-mode forward under no_grad (this rank's share alone)."""
    generator = torch.Generator().manual_seed(1)  # the same global batch on both ranks
    with torch.no_grad():
        plain.weight.copy_(torch.rand(plain.num_features, generator=generator) + 0.5)
        plain.bias.copy_(torch.randn(plain.num_features, generator=generator))
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    start = sum(SHARES[:rank])
    share = slice(start, start + SHARES[rank])
    report = {"type": type(synced).__name__, "found_by_recompute": len(batchnorm_layers(synced)), "output": 0.0,
              "input_grad": 0.0}
    for _ in range(2):
        # Far from zero mean: a one-pass E[x^2] - E[x]^2 would lose digits here.
        x = torch.randn(sum(SHARES), *shape, generator=generator) * 3 + 20
        upstream = torch.randn(x.shape, generator=generator)
        whole = x.clone().requires_grad_()
        expected = plain(whole)
        (expected * upstream).sum().backward()
        mine = x[share].clone().requires_grad_()
        out = synced(mine)
        (out * upstream[share]).sum().backward()
        report["output"] = max(report["output"], biggest(out, expected[share]))
        report["input_grad"] = max(report["input_grad"], biggest(mine.grad, whole.grad[share]))
    # Parameter gradients: each rank holds its share's part, and DDP would sum (average) them.
    grads = torch.cat([synced.weight.grad, synced.bias.grad])
    dist.all_reduce(grads)
    report["param_grad"] = biggest(grads, torch.cat([plain.weight.grad, plain.bias.grad]))
    report["running_mean"] = biggest(synced.running_mean, plain.running_mean)
    report["running_var"] = biggest(synced.running_var, plain.running_var)
    report["num_batches_tracked"] = int(synced.num_batches_tracked)

    x = torch.randn(sum(SHARES), *shape, generator=generator) * 3 + 20
    synced.eval(), plain.eval()
    with torch.no_grad():
        report["eval_output"] = biggest(synced(x[share]), plain(x[share]))
    # Train mode under no_grad (what the BN recompute runs): this rank's share alone, no collective.
    synced.train(), plain.train()
    local = copy.deepcopy(plain)
    with torch.no_grad():
        report["no_grad_vs_local"] = biggest(synced(x[share]), local(x[share]))
        report["no_grad_vs_global"] = biggest(synced(x[share]), plain(x)[share])
    return report


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 16, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def forward(self, pixel_values):
        return self.head(torch.relu(self.bn(self.conv(pixel_values))))


def recompute_with_synced_layers(rank: int) -> dict:
    """`recompute_bn` on 2 ranks with uneven batch counts (3 and 2) on a model with synced layers, against the
    one-process recompute of a plain copy over all 5 batches: the recompute's forwards (no_grad) never synchronise,
    so the ranks neither hang nor mix their batches."""
    torch.manual_seed(0)
    plain = Net()
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    generator = torch.Generator().manual_seed(2)
    batches = [{"pixel_values": torch.randn(4, 3, 6, 6, generator=generator) * 2 + i, "labels": torch.zeros(4)}
               for i in range(5)]
    mine = batches[rank::2]
    seen = recompute_bn(synced, lambda: mine, torch.device("cpu"), num_processes=2)
    alone = recompute_bn(plain, lambda: batches, torch.device("cpu"), num_processes=1)
    state, expected = synced.state_dict(), plain.state_dict()
    return {"batches": seen, "batches_alone": alone, "state_keys_equal": list(state) == list(expected),
            "statistics": max(biggest(state[k], expected[k]) for k in expected if "running" in k)}


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    report = {"world_size": dist.get_world_size(),
              "bn2d": layer_against_plain(nn.BatchNorm2d(3), (3, 5, 4), rank),
              "bn1d_cumulative": layer_against_plain(nn.BatchNorm1d(6, momentum=None), (6,), rank),
              "recompute": recompute_with_synced_layers(rank)}
    reports = [None, None]
    dist.all_gather_object(reports, report)
    if rank == 0:
        merged = {}
        for key, value in reports[0].items():
            if isinstance(value, dict):
                merged[key] = {k: max(r[key][k] for r in reports) if isinstance(v, float) else v
                               for k, v in value.items()}
                if "no_grad_vs_global" in value:  # (how far the local statistics are from the global ones)
                    merged[key]["no_grad_vs_global"] = min(r[key]["no_grad_vs_global"] for r in reports)
            else:
                merged[key] = value
        Path(sys.argv[1]).write_text(json.dumps(merged))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
