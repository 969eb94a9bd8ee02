"""Time per optimizer step of a recipe against a bare loop of the same model on the same batches.

Each measurement runs in its own process (so compile caches, allocator state and accelerate's
singletons never leak between them) and prints one JSON line:

  bare    the model, optimizer and autocast of the recipe, stepping over batches that were built
          beforehand and held on the device: forward, loss, backward, optimizer step, nothing else.
  recipe  the recipe itself (data path, accelerate loop, schedule, averaging, logging) with
          evaluation and checkpoints switched off while it is timed.

Both time the steps after `--warmup` (which absorbs torch.compile) with the device synchronised at
both ends of the window only.

Under torch_xla (PJRT_DEVICE=CPU, or a TPU) both run on the XLA device: the bare loop cuts one graph per step.

Usage:
  python benchmarks/bench_loop.py bare    RECIPE.yaml [--key value ...] [--steps N --warmup W --compile]
  python benchmarks/bench_loop.py recipe  RECIPE.yaml [--key value ...] [--steps N --warmup W]
  python benchmarks/bench_loop.py compare RECIPE.yaml [--key value ...] [--repeats 3]   # alternates the two,
      # each in a fresh process, and reports the fastest of each and their ratio (machine noise only slows)
(for the recipe, compile comes from the accelerate config or `--dynamo_backend` of accelerate launch;
 here the environment variable ACCELERATE_DYNAMO_BACKEND=INDUCTOR does the same in one process.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import is_compiled_module

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swa_accel.batches import forward_logits  # noqa: E402
from swa_accel.runner.loop import RecipeTrainer  # noqa: E402
from swa_accel.runner.xla import mark_step  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xla":  # run what was traced, then wait for it
        import torch_xla.core.xla_model as xm

        xm.mark_step()
        xm.wait_device_ops()


def recipe_module(config: str):
    """The recipe module whose `setup` reads `config` (recipes/<name>/configs/*.yaml)."""
    name = Path(config).resolve().parent.parent.name
    if name == "vision":
        from recipes.vision import train as module
    elif name == "text":
        from recipes.text import train as module
    else:
        raise SystemExit(f"unknown recipe for {config}")
    return module


def recipe_argv(config: str, overrides: list[str], steps: int) -> list[str]:
    # No evaluation or checkpoint, and the run stops after the last timed step, as a preemption would:
    # a compiled model would otherwise recompile for the final evaluation, which is not a training step.
    return ["--config", config, *overrides, "--max_train_steps", str(steps), "--stop_after_step", str(steps),
            "--eval_steps", str(10**9), "--checkpointing_steps", "None", "--plot", "false",
            "--overwrite_output_dir", "true"]


def run_recipe_timed(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    from swa_accel.runner.cli import run_recipe

    marks: dict[int, float] = {}
    compiled = []
    original = RecipeTrainer.after_optimizer_step

    def timed_step(self):
        original(self)
        compiled[:] = [is_compiled_module(self.model)]
        if self.state.global_step in (warmup, steps):
            synchronize(self.accelerator.device)
            marks[self.state.global_step] = time.perf_counter()

    RecipeTrainer.after_optimizer_step = timed_step
    run_recipe(recipe_module(config).setup, recipe_argv(config, overrides, steps))
    return {"ms_per_step": 1e3 * (marks[steps] - marks[warmup]) / (steps - warmup), "compiled": compiled[0]}


def run_bare(config: str, overrides: list[str], steps: int, warmup: int, compile_model: bool) -> dict:
    """The recipe's own setup builds model, data and optimizer; then a plain loop over held batches."""
    from recipes.vision.image_tensors import ImageTensorDataset
    from swa_accel.runner.loop import DTYPES
    from swa_accel.runner.task import seeded_dataset
    from swa_accel.runner.optim import build_optimizer
    from swa_accel.seeding import TRAIN_STREAM

    module = recipe_module(config)
    task, training, _, accelerator, _ = module.setup(recipe_argv(config, overrides, steps))
    device = accelerator.device
    model = task.build_model().to(DTYPES[training.model_dtype]).to(device)
    optimizer = build_optimizer(model, training)
    if compile_model:
        model = torch.compile(model)
    dataset = seeded_dataset(task, training.seed, TRAIN_STREAM)
    if isinstance(dataset, ImageTensorDataset):
        dataset.place(device, True)
    batch_size, count = training.per_device_train_batch_size, min(steps, len(dataset) // training.per_device_train_batch_size)
    batches = []
    for i in range(count):
        rows = list(range(i * batch_size, (i + 1) * batch_size))
        batch = dataset.__getitems__(rows) if isinstance(dataset, ImageTensorDataset) else \
            task.collate_fn([dataset[r] for r in rows])
        batches.append({k: v.to(device) for k, v in batch.items()})
    input_dtype = None if training.model_dtype == "float32" else DTYPES[training.model_dtype]
    model.train()
    start = None
    for step in range(steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        with accelerator.autocast():
            logits, labels = forward_logits(model, batches[step % count], input_dtype)
            loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "xla":
            mark_step()  # one graph per step, as accelerate's loader wrapper cuts the recipe's
    synchronize(device)
    return {"ms_per_step": 1e3 * (time.perf_counter() - start) / (steps - warmup), "held_batches": count,
            "compiled": compile_model}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    from accelerate.utils import is_torch_xla_available

    return "xla (PJRT_DEVICE=CPU)" if is_torch_xla_available() and not is_torch_xla_available(check_is_tpu=True) \
        else "tpu" if is_torch_xla_available() else "cpu"


def compare(args, overrides: list[str]) -> dict:
    """Alternates bare and recipe runs in fresh processes; the fastest of each is the least disturbed."""
    import subprocess

    times: dict[str, list[float]] = {"bare": [], "recipe": []}
    for _ in range(args.repeats):
        for mode in times:
            command = [sys.executable, __file__, mode, args.config, *overrides, "--steps", str(args.steps),
                       "--warmup", str(args.warmup)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            line = next(x for x in output.splitlines() if x.startswith("BENCH "))
            times[mode].append(json.loads(line[6:])["ms_per_step"])
    best = {mode: min(values) for mode, values in times.items()}
    return {"bare_ms": round(best["bare"], 3), "recipe_ms": round(best["recipe"], 3),
            "ratio": round(best["recipe"] / best["bare"], 3), "all_ms": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("bare", "recipe", "compare"))
    parser.add_argument("--repeats", type=int, default=3, help="compare: runs of each")
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--compile", action="store_true", help="bare loop: torch.compile the model (inductor)")
    args, overrides = parser.parse_known_args()
    start = time.perf_counter()
    if args.mode == "compare":
        result = compare(args, overrides)
    elif args.mode == "bare":
        result = run_bare(args.config, overrides, args.steps, args.warmup, args.compile)
    else:
        result = run_recipe_timed(args.config, overrides, args.steps, args.warmup)
    result.update(mode=args.mode, config=args.config, overrides=overrides, steps=args.steps, warmup=args.warmup,
                  device=device_name(),
                  process_s=round(time.perf_counter() - start, 1))
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
