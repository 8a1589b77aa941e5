"""The wheel ships the stages and the CLI, not the dev kit (test doubles, demo models), and its `codetune demo`
says in one line that it needs a source checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    assert {"events", "handlers", "storage", "infra"} <= tops and "devkit" not in tops and "tests" not in tops
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
