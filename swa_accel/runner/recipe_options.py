"""A recipe's options read from its source, without importing it: the names, types, defaults and help texts of the
dataclasses its `parse_config(...)` call names.

Importing a recipe costs seconds (its dataclasses sit beside torch, transformers and datasets code), so the launcher
reads the files instead: that is how `./run.sh --help` lists every option and how a misspelt option is refused
before any heavy import. Only the standard library is used here.
"""

from __future__ import annotations

import argparse
import ast
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

#: The repository root, under which `import a.b` is the file a/b.py (or a/b/__init__.py).
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class OptionField:
    """One dataclass field as a command-line option."""

    name: str
    type_text: str  # the annotation as written, e.g. "Optional[int]"
    default_text: Optional[str]  # None when the default is computed (default_factory) or absent
    help: str

    @property
    def optional(self) -> bool:
        """Typed Optional[...]: `--key none` unsets it."""
        return self.type_text.startswith(("Optional[", "typing.Optional[")) or self.type_text.endswith("| None")


@dataclass(frozen=True)
class OptionClass:
    """A dataclass of options: where it is defined and what it holds."""

    path: Path
    name: str
    summary: str  # the first line of its docstring
    fields: tuple[OptionField, ...]


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _module_file(module: str, level: int, importer: Path) -> Path:
    """The file that `from <level dots><module> import ...` in `importer` reads."""
    base = importer.parent
    for _ in range(max(level - 1, 0)):
        base = base.parent
    parts = module.split(".") if module else []
    folder = (base if level else ROOT).joinpath(*parts)
    for candidate in (folder.with_suffix(".py"), folder / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise LookupError(f"cannot find module {'.' * level}{module} from {importer}")


def _find_class(path: Path, name: str, depth: int = 0) -> tuple[Path, ast.ClassDef, ast.Module]:
    """Follows imports (and re-exports such as a package's __init__) to where class `name` is defined."""
    if depth > 8:
        raise LookupError(f"{name}: imports nest too deep")
    tree = _parse(path)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return path, node, tree
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _find_class(_module_file(node.module or "", node.level, path), alias.name, depth + 1)
    raise LookupError(f"{name}: not defined or imported in {path}")


def _constants(tree: ast.Module) -> dict[str, object]:
    """Module-level `NAME = <literal>` assignments, so that a default such as DIGITS_NAME shows its value."""
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def _default_text(node: Optional[ast.expr], constants: dict[str, object]) -> Optional[str]:
    if node is None:
        return None
    if isinstance(node, ast.Name) and node.id in constants:
        return repr(constants[node.id])
    try:
        return repr(ast.literal_eval(node))
    except ValueError:
        return ast.unparse(node)


def _field(node: ast.AnnAssign, constants: dict[str, object]) -> OptionField:
    """A field written as `name: T = value`, `= field(default=..., metadata={"help": ...})` or `= _help(text, ...)`."""
    name, type_text = node.target.id, ast.unparse(node.annotation)
    value = node.value
    if not isinstance(value, ast.Call):
        return OptionField(name, type_text, _default_text(value, constants), "")
    keywords = {keyword.arg: keyword.value for keyword in value.keywords}
    text = ""
    if "metadata" in keywords:
        text = ast.literal_eval(keywords["metadata"]).get("help", "")
    elif value.args and isinstance(value.args[0], ast.Constant):  # the `_help(text, default=...)` helpers
        text = value.args[0].value
    return OptionField(name, type_text, _default_text(keywords.get("default"), constants), text)


def read_class(path: Path, name: str) -> OptionClass:
    """The option dataclass `name` as `path` defines or imports it."""
    path, node, tree = _find_class(path, name)
    constants = _constants(tree)
    fields = tuple(_field(statement, constants) for statement in node.body
                   if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                   and "ClassVar" not in ast.unparse(statement.annotation))
    summary = (ast.get_docstring(node) or "").strip().split("\n")[0]
    return OptionClass(path, name, summary, fields)


def read_classes(dataclass_types: tuple[type, ...]) -> list[OptionClass]:
    """The same reading for dataclasses already imported, so that a recipe's own `--help` matches run.sh's."""
    return [read_class(Path(inspect.getsourcefile(dtype)), dtype.__name__) for dtype in dataclass_types]


def recipe_options(script: Path) -> tuple[Optional[str], list[OptionClass]]:
    """(recipe name, option classes) of a recipe script, from its `parse_config((A, B, ...), argv, recipe=...)` call.

    Raises:
        LookupError: the script has no such call, or a class cannot be found.
    """
    for node in ast.walk(_parse(script)):
        if not isinstance(node, ast.Call):
            continue
        called = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if called != "parse_config" or not node.args or not isinstance(node.args[0], ast.Tuple):
            continue
        recipe = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "recipe"), None)
        return recipe, [read_class(script, element.id) for element in node.args[0].elts]
    raise LookupError(f"{script}: no parse_config((...), argv) call to read the options from")


def _metavar(type_text: str) -> str:
    inner = type_text.removeprefix("Optional[").removesuffix("]").removesuffix(" | None")
    return inner.upper()


def options_help(classes: list[OptionClass], usage: str, description: str) -> str:
    """Every option with its type, default and help text, one group per dataclass, as argparse lays help out."""
    parser = argparse.ArgumentParser(usage=usage, description=description, add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    general = parser.add_argument_group("general")
    general.add_argument("-h", "--help", action="store_true", help="Show this list and exit.")
    general.add_argument("--config", metavar="FILE.yaml", help="The recipe config; every option below can also be "
                         "a key there. Options on the command line override it; --key none unsets an optional one.")
    for option_class in classes:
        group = parser.add_argument_group(option_class.name, option_class.summary or None)
        for option in option_class.fields:
            default = "" if option.default_text is None else f" (default: {option.default_text})"
            text = f"{option.help}{default}".replace("%", "%%")  # argparse expands % in help texts
            group.add_argument(f"--{option.name}", metavar=_metavar(option.type_text), help=text)
    return parser.format_help()
