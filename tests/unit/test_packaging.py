"""Packaging: the wheel ships the stages and the CLI, not the dev kit (test doubles, demo models); its
`codetune demo` says in one line that it needs a source checkout, while a checkout's demo finds the dev kit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the tracked files (building in place would leave build/ behind)."""
    src = tmp_path_factory.mktemp("src")
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    for rel in tracked:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    return next(out.glob("codetune-*.whl"))


def test_the_wheel_leaves_the_dev_kit_out(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {"core", "events", "handlers", "storage", "infra"} <= tops and "devkit" not in tops and "tests" not in tops
    assert not [n for n in names if "standin" in n or "tinymodel" in n]
    assert "handlers/ollama_format/gotemplate.py" in names and "infra/hubcache.py" in names


def test_demo_from_the_wheel_says_it_needs_a_checkout(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", "from infra.cli import main; main()", "demo"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode != 0
    assert lines == ["error: codetune demo needs a source checkout (devkit/ is not in the wheel)"]


def test_demo_from_an_editable_install_finds_the_dev_kit(tmp_path: Path) -> None:
    """An editable install maps only the shipped packages (`infra` → the checkout's infra/); the demo then puts
    the checkout's root on the path itself, so `devkit` imports without it being installed."""
    mapped = tmp_path / "mapped"
    mapped.mkdir()
    for pkg in ("core", "events", "handlers", "storage", "infra"):
        (mapped / pkg).symlink_to(ROOT / pkg)
    code = ("import importlib.util; from infra.demo import devkit_or_error; "
            "assert importlib.util.find_spec('devkit') is None; print(devkit_or_error()); "
            "import devkit.tinymodel; print(devkit.tinymodel.__file__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(mapped)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["None", str(ROOT / "devkit" / "tinymodel.py")]


def test_test_modules_have_unique_names() -> None:
    """tests/ has no packages (pytest's rootdir imports): two test files of one name in tests/unit and
    tests/stack make the whole run fail to collect, though each folder alone passes."""
    root = Path(__file__).resolve().parents[1]
    names = [p.name for p in root.rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
