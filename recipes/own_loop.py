"""SWA in your own accelerate loop: one `SWA` object, four lines on top of the loop (marked `# SWA`).

    pip install -e .     # once, from this repository: then `import swa_accel` works in any script
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/own_loop.py --output_dir outputs/own_loop
    (or, without installing, from the repository root: PYTHONPATH=. accelerate launch ...)

A BatchNorm MLP on scikit-learn's digits: constant LR, then SWALR's anneal to swa_lr and one average per
epoch from `swa_start_epoch`; at the end the average gets its BN statistics recomputed across ranks and is
evaluated. It saves every averaged snapshot, so that its average can be checked against their mean.

Resumable: `accelerator.save_state` at every epoch end holds the average too (the SWA object registers itself),
and `--resume` goes on from the last one exactly, because the shuffle is a function of (seed, epoch)
(`use_seedable_sampler=True` and `set_epoch`); `--stop_after_epoch N` stops as a preemption would.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from swa_accel import SWA, SWAArguments  # SWA
from swa_accel.runner.launch import end_process


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def digits(train: bool) -> TensorDataset:
    bunch = load_digits()
    x, y = torch.tensor(bunch.data, dtype=torch.float32) / 16.0, torch.tensor(bunch.target)
    return TensorDataset(x[:1400], y[:1400]) if train else TensorDataset(x[1400:], y[1400:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/own_loop")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--swa_start_epoch", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=32, help="per process")
    parser.add_argument("--stop_after_epoch", type=int, default=None, help="stop after this epoch's checkpoint")
    parser.add_argument("--resume", action="store_true", help="go on from output_dir/checkpoint")
    args = parser.parse_args()

    # cpu=True lets 2 CPU processes form a group; a seedable sampler makes the shuffle a function of (seed, epoch),
    # so that a resumed run sees the order an uninterrupted one would.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(0)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(digits(train=True), batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(digits(train=False), batch_size=128)
    model, optimizer, loader, test_loader = accelerator.prepare(model, optimizer, loader, test_loader)
    swa = SWA(accelerator, model, optimizer, loader, SWAArguments(swa_start_epoch=args.swa_start_epoch,  # SWA
                                                                  swa_lr=0.05), num_epochs=args.epochs)

    output = Path(args.output_dir)
    (output / "snapshots").mkdir(parents=True, exist_ok=True)
    first_epoch = 0
    if args.resume:
        accelerator.load_state(str(output / "checkpoint"))  # the model, optimizer, RNGs and the average
        first_epoch = swa.steps_done // len(loader)
    for epoch in range(first_epoch, args.epochs):
        loader.set_epoch(epoch)
        model.train()
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            swa.step()  # SWA: averages when due, and sets the SWA phase's LR
        if accelerator.is_main_process and swa.n_averaged > len(list((output / "snapshots").iterdir())):
            # (for the check against the mean of the snapshots, not needed for SWA)
            weights = {k: v.detach().float().cpu() for k, v in accelerator.unwrap_model(model).named_parameters()}
            save_file(weights, str(output / "snapshots" / f"{swa.n_averaged:03d}.safetensors"))
        accelerator.save_state(str(output / "checkpoint"))
        if epoch + 1 == args.stop_after_epoch:
            accelerator.wait_for_everyone()
            end_process(0)
            return

    # On every rank: the average, BN statistics recomputed over the whole training set, each rank its share.
    with swa.average_in_model(full_bn_pass=True) as swa_model:  # SWA
        swa_model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in test_loader:
                predictions, labels = accelerator.gather_for_metrics((swa_model(x).argmax(-1), y))
                correct += (predictions == labels).sum().item()
                total += len(labels)
        if accelerator.is_main_process:
            save_file({k: v.cpu() for k, v in swa_model.state_dict().items()}, str(output / "swa.safetensors"))
            print(f"swa test accuracy {correct / total:.4f} over {total} images; {swa.n_averaged} snapshots "
                  f"averaged; swa phase lr {optimizer.param_groups[0]['lr']:g}")
    # Every rank leaves together. On CPU processes (gloo) end_process then skips the interpreter's teardown,
    # where torch 2.13's gloo can deadlock or abort after all the work is done.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    end_process(0)


if __name__ == "__main__":
    main()
