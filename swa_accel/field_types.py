"""Every config value against its field's type, whatever its source: YAML, the command line, or code.

The command line goes through argparse, which converts and refuses; a YAML value or one given to a dataclass
in code does not. `check_field_types` (called first in each config dataclass's `__post_init__`) gives them the
same treatment, with one line naming the field: a whole number where an int is due (3.0 passes as 3, 2.5 does
not), a number for a float, true/false for a bool, text for a str (a YAML number there is read as its text,
as on the command line).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Union

from .errors import ConfigError

_NONE = type(None)


def _expected(kind: Any) -> str:
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text"}.get(kind, str(kind))


def _converted(name: str, kind: Any, value: Any) -> Any:
    """`value` as a `kind`, or a ConfigError naming the field."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value  # a type this check does not know: left to the field's own validation
    raise ConfigError(f"{name}: must be {_expected(kind)}, got {value!r}")


def check_field_types(instance: Any, skip: frozenset[str] = frozenset()) -> None:
    """Converts or refuses each field of a dataclass instance in place (fields in `skip` validate themselves)."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        if field.name in skip:
            continue
        kind, value = hints[field.name], getattr(instance, field.name)
        optional = typing.get_origin(kind) is Union and _NONE in typing.get_args(kind)
        if optional:
            if value is None:
                continue
            kind = next(arg for arg in typing.get_args(kind) if arg is not _NONE)
        elif value is None:
            raise ConfigError(f"{field.name}: must be {_expected(kind)}, got None (this field has no 'none')")
        setattr(instance, field.name, _converted(field.name, kind, value))
