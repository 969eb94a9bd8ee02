"""The process count the launcher was asked for, where it can be seen, against the one this run has.

`accelerate launch --num_processes 2 ...` with no multi-process config runs one process on a machine without GPUs,
and says nothing; the run then trains alone, as asked for nowhere. The training process can see what was asked for
in the command line of the `accelerate launch` that started it (its parent process, or run.sh's quiet launcher),
read with accelerate's own argument parser: `--num_processes`, else its config file's `num_processes`.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Optional


def parent_command_line() -> list[str]:
    """The parent process's argv (Linux /proc); empty where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def launch_arguments(argv: list[str]) -> Optional[list[str]]:
    """The arguments after `launch` when `argv` is an `accelerate launch` (or run.sh's quiet launcher); else None."""
    if "launch" not in argv:
        return None
    head = argv[:argv.index("launch")]
    if not any(Path(part).name in ("accelerate", "quiet_launch.py") or part.endswith("accelerate_cli")
               for part in head):
        return None
    return argv[argv.index("launch") + 1:]


def requested_processes(argv: list[str]) -> Optional[tuple[int, str]]:
    """(count, where it was asked for) from an `accelerate launch` command line; None if it asks for none."""
    arguments = launch_arguments(argv)
    if arguments is None:
        return None
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage text on a line it cannot parse
            args = launch_command_parser().parse_args(arguments)
    except SystemExit:  # not a command line this accelerate understands: nothing to compare
        return None
    if args.num_processes is not None:
        return args.num_processes, f"--num_processes {args.num_processes}"
    if args.config_file is None:
        return None
    try:
        count = load_config_from_file(args.config_file).num_processes
    except Exception:  # accelerate itself read this file to start us; a second read failing says nothing
        return None
    return (count, f"num_processes: {count} in {args.config_file}") if isinstance(count, int) and count > 0 else None


def process_count_warning(actual: int, argv: Optional[list[str]] = None) -> Optional[str]:
    """A warning line when the launch asked for another process count than this run has; None when they agree or
    the request cannot be seen."""
    request = requested_processes(parent_command_line() if argv is None else argv)
    if request is None or request[0] == actual:
        return None
    count, source = request
    fix = ("on a machine without GPUs, `accelerate launch` starts one process unless its config is a multi-process "
           "one: use --config_file accelerate_configs/cpu_2proc.yaml (MULTI_GPU, gloo) with your --num_processes, "
           "or add --multi_gpu") if actual == 1 else "check the launcher's config and its --num_processes"
    return f"warning: the launch asked for {count} processes ({source}) but this run has {actual}; {fix}"
