"""The launcher's config check: run.sh runs it before `accelerate launch`, so that a config error, or --help, answers
in a fraction of a second instead of after torch, transformers and datasets have loaded (about 10 s).

    python swa_accel/runner/early_check.py recipes/vision/train.py --config FILE.yaml [--key value ...]

It refuses what the recipe's own parse (`config.parse_config`) refuses, with the same one line and status 1: a
missing or invalid config file, a config of another recipe, an unknown key or option, and a value that the
runner's own dataclasses (RunArguments, SWAArguments) reject. The recipe's dataclasses sit in modules that import
torch, so here their options are checked by name only (read from the source, recipe_options.py); their values are
checked when the recipe starts. With `-h`/`--help` it prints every option of the recipe and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: register `swa_accel` and `swa_accel.runner` as bare packages, so that the light modules below
    # import without the packages' __init__ (which loads torch and the training loop), and let the relative imports
    # resolve in them (PEP 366). This process only checks and exits; it never trains.
    import types

    _ROOT = Path(__file__).resolve().parents[2]
    sys.path[0] = str(_ROOT)  # (not this folder, whose module names would shadow top-level ones)
    for _name in ("swa_accel", "swa_accel.runner"):
        _package = types.ModuleType(_name)
        _package.__path__ = [str(_ROOT.joinpath(*_name.split(".")))]
        sys.modules[_name] = _package
    __package__ = "swa_accel.runner"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import typing  # noqa: E402
from typing import Any, Optional  # noqa: E402

from .config import (TRACEBACK_VARIABLE, ConfigError, OneLineErrors, check_option_names,  # noqa: E402
                     config_file_values, first_line, help_description, split_config_flag, split_unset_flags,
                     wants_help)
from .recipe_options import ROOT, OptionClass, options_help, recipe_options  # noqa: E402

RUN_SH_USAGE = "./run.sh [--accelerate_config FILE] [CONFIG.yaml] [--key value ...]"
RUN_SH_NOTE = ("run.sh itself: --accelerate_config FILE (first) picks the launch settings; ./run.sh test [PATH ...] "
               "runs the tests.")


class OneLineArgumentParser(OneLineErrors, argparse.ArgumentParser):
    pass


def string_to_bool(value: Any) -> bool:
    """transformers.hf_argparser.string_to_bool: how HfArgumentParser reads a bool option."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"Truthy value expected: got {value} but expected one of yes/no, true/false, "
                                     "t/f, y/n, 1/0 (case insensitive).")


def _option_type(hint: Any) -> Any:
    """The type argparse converts with, as HfArgumentParser picks it: Optional[X] reads as X, except Optional[bool]."""
    arguments = typing.get_args(hint)
    if type(None) in arguments and bool not in arguments and len(arguments) == 2:
        return next(argument for argument in arguments if argument is not type(None))
    return hint


def _simple(dtype: type) -> bool:
    """Whether every field is a str, int, float or bool (or Optional of one), the types `light_parser` handles."""
    hints = typing.get_type_hints(dtype)
    return all(_option_type(hints[f.name]) in (str, int, float, bool, Optional[bool]) for f in dataclasses.fields(dtype))


def light_parser(dataclass_types: list[type]) -> argparse.ArgumentParser:
    """A plain argparse parser of these dataclasses' fields, built as transformers.HfArgumentParser builds its own
    (the same flags, `--no_x` complements, conversions and so the same error lines), without importing transformers.
    Options of other dataclasses are left over by `parse_known_args` (abbreviations are off, so none is taken for one
    of these)."""
    parser = OneLineArgumentParser(add_help=False, allow_abbrev=False)
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            kind = _option_type(hints[f.name])
            has_default = f.default is not dataclasses.MISSING
            default = f.default if has_default else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if kind in (bool, Optional[bool]):
                kwargs: dict[str, Any] = {"type": string_to_bool}
                if kind is bool or (has_default and f.default is not None):
                    kwargs.update(default=f.default if has_default else False, nargs="?", const=True)
                parser.add_argument(*names, **kwargs)
                if f.default is True:
                    parser.add_argument(f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", action="store_false",
                                        dest=f.name)
            else:
                required = not has_default and f.default_factory is dataclasses.MISSING
                parser.add_argument(*names, type=kind, default=default, required=required)
    return parser


def importable(option_class: OptionClass) -> Optional[type]:
    """The class itself when it lives in swa_accel (whose config modules import no torch), else None."""
    try:
        relative = option_class.path.relative_to(ROOT / "swa_accel")
    except ValueError:
        return None
    module = ".".join(("swa_accel", *relative.with_suffix("").parts))
    dtype = getattr(importlib.import_module(module), option_class.name)
    return dtype if _simple(dtype) else None


def check(classes: list[OptionClass], recipe: Optional[str], argv: list[str]) -> None:
    """Raises the ConfigError (or ValueError) that the recipe's own parse would raise first, for what it can see."""
    known = {f.name for option_class in classes for f in option_class.fields}
    config, rest = split_config_flag(argv)
    values = config_file_values(config, known, recipe) if config is not None else {}
    check_option_names(rest, known)
    rest, unset = split_unset_flags(rest, {f.name for c in classes for f in c.fields if f.optional})
    light = [dtype for dtype in map(importable, classes) if dtype is not None]
    own = {f.name for dtype in light for f in dataclasses.fields(dtype)}
    parser = light_parser(light)
    parser.set_defaults(**{name: value for name, value in values.items() if name in own})
    parser.set_defaults(**{name: None for name in unset if name in own})
    namespace, _ = parser.parse_known_args(rest)
    for dtype in light:  # (their __post_init__ raises ConfigError with the field's name)
        dtype(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(dtype) if f.init})


def main(argv: list[str]) -> int:
    """`argv`: the recipe script, then its arguments. Returns the exit status: 0 to go on (or after --help), 1 after
    printing the error line."""
    script, arguments = Path(argv[0]), argv[1:]
    try:
        recipe, classes = recipe_options(script)
    except (LookupError, SyntaxError, OSError):
        return 0  # not a recipe this check can read: the recipe's own parse checks everything, as before
    if wants_help(arguments):
        print(options_help(classes, usage=RUN_SH_USAGE, description=f"{help_description(recipe)}\n{RUN_SH_NOTE}"))
        return 0
    try:
        check(classes, recipe, arguments)
    except (ConfigError, ValueError, TypeError) as error:
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
