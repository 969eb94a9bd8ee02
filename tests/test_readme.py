"""The README and docs/ against the code: every option they name exists, every repository path they name is there,
every link between them resolves, and every table renders as one table. (The README's pipeline example and the
default job's plan line are run and compared in test_default_job.py.)"""

import dataclasses
import re

import pytest
from accelerate.commands.launch import launch_command_parser

from recipes.text.data import TextDataArguments
from recipes.text.train import TextModelArguments
from recipes.vision.data import VisionDataArguments
from recipes.vision.model_setup import VisionModelArguments
from swa_accel.runner.config import RunArguments, SWAArguments
from tests.helpers.launch import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_IDS = [str(page.relative_to(ROOT)) for page in PAGES]


def known_options() -> set[str]:
    """Every `--option` something in this repository takes: the recipes' dataclasses, accelerate launch, run.sh,
    and the argparse scripts (own_loop.py, hf_trainer.py, benchmarks)."""
    options = {field.name for kind in (RunArguments, SWAArguments, VisionDataArguments, VisionModelArguments,
                                       TextDataArguments, TextModelArguments) for field in dataclasses.fields(kind)}
    options |= {string[2:] for action in launch_command_parser()._actions for string in action.option_strings
                if string.startswith("--")}
    for script in [ROOT / "run.sh", *ROOT.glob("recipes/*.py"), *ROOT.glob("benchmarks/*.py"),
                   *ROOT.glob("swa_accel/**/*.py")]:
        options |= set(re.findall(r"""["'\s]--([a-z][a-z0-9_]*)""", script.read_text()))
    return options | {"help", "key"}  # `--key value`: the README's placeholder


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_option_a_page_names_exists(page):
    named = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9_]*)", page.read_text()))
    foreign = {"quiet", "no-deps", "upgrade", "signal", "requeue", "durations", "only-binary"}  # pip, sbatch, pytest
    unknown = sorted(named - known_options() - foreign)
    assert not unknown, f"{page.name} names options nothing takes: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_repository_path_and_link_a_page_names_is_there(page):
    text = page.read_text()
    tops = ("recipes/", "accelerate_configs/", "docs/", "benchmarks/", "swa_accel/", "tests/", ".ci/")
    paths = {token for token in re.findall(r"`([A-Za-z0-9_./-]+)`", text) if token.startswith(tops)}
    links = {target.split("#")[0] for target in re.findall(r"\]\(([^)#][^)]*)\)", text)
             if not target.startswith("http")}
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    missing += sorted(link for link in links if link and not (page.parent / link).exists())
    assert not missing, f"{page.name} names what the repository does not have: {missing}"


def cells(row: str) -> int:
    """Columns of a table row: pipes that are not escaped (`\\|`) nor inside code spans."""
    without_code = re.sub(r"`[^`]*`", "", row)
    return len(re.findall(r"(?<!\\)\|", without_code)) - 1


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_table_renders_as_one_table(page):
    lines = page.read_text().splitlines()
    in_code, columns = False, None
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("|"):
            columns = None
            continue
        if columns is None:  # a table starts: a header, then its separator
            separator = lines[number] if number < len(lines) else ""
            assert re.fullmatch(r"\|( *:?-+:? *\|)+", separator), \
                f"{page.name}:{number}: a table row with no header above it (a blank line splits the table?)"
            columns = cells(line)
        assert cells(line) == columns, f"{page.name}:{number}: {cells(line)} cells, the table has {columns}"
