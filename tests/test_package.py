"""swa_accel as a library: the package installs with requirements.txt's pins, and the own-loop example works."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile


from tests.helpers.launch import ROOT, launch
from tests.helpers.own_loop import (OWN_LOOP, assert_averages_its_snapshots_and_recomputes_bn,
                                     own_loop_args)


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_the_package_pins_are_requirements_txt_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = requirement_pins()
    for dependency in project["dependencies"]:
        name, version = dependency.split("==")
        assert pins[name.lower().replace("_", "-")] == version, dependency
    assert {"torch", "accelerate", "transformers"} <= {d.split("==")[0] for d in project["dependencies"]}


def test_the_wheel_holds_every_module_and_metric_and_imports_outside_the_repository(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("swa_accel", "recipes"):  # (the recipes too: the wheel must leave them out by itself)
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, text=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("swa_accel-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "swa_accel").glob("**/*.py") if "metrics" not in p.parts}
    metrics = {str(p.relative_to(ROOT)) for p in (ROOT / "swa_accel" / "runner" / "metrics").glob("*/*.py")}
    assert modules <= names and metrics <= names and len(metrics) == 5
    # One top-level name: swa_accel (beside the wheel's own metadata folder), no `recipes` to collide with a user's.
    assert {name.split("/")[0] for name in names} == {"swa_accel", "swa_accel-0.1.0.dist-info"}
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: accelerate==1.15.0" in metadata and "Requires-Dist: torch==2.13.0" in metadata

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    assert sorted(p.name for p in target.iterdir()) == ["swa_accel", "swa_accel-0.1.0.dist-info"]
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", "import swa_accel, swa_accel.runner; print(swa_accel.__file__); "
                             "print(swa_accel.runner.__file__); print(sorted(swa_accel.__all__)[:3])"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.splitlines()[0] == str(target / "swa_accel" / "__init__.py")
    assert result.stdout.splitlines()[1] == str(target / "swa_accel" / "runner" / "__init__.py")


def test_the_own_loop_needs_at_most_five_lines_of_swa():
    lines = [line for line in (ROOT / "recipes" / "own_loop.py").read_text().splitlines()
             if "# SWA" in line and not line.lstrip().startswith(("#", '"'))]
    assert 1 <= len(lines) <= 5, lines


def test_the_own_loop_example_averages_its_snapshots_and_recomputes_bn(tmp_path, monkeypatch):
    # (on 2 processes: tests/test_own_loop_guards.py, whose resume test shares that run)
    out = tmp_path / "own"
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # as after `pip install -e .`
    result = launch(OWN_LOOP, own_loop_args(out, 32))
    assert_averages_its_snapshots_and_recomputes_bn(out, result.stdout, 32)