"""Installed size of each per-stage extra: what one stage's image carries on top of Python.

    .venv/bin/python bench/bench_extras.py            # every extra of pyproject.toml's per-stage set
    .venv/bin/python bench/bench_extras.py --list tuning

How: the requirements of the base and of each extra are read from pyproject.toml (self-references such
as `codetune[train]` expanded), then their dependency closure is resolved over the distributions
installed in THIS environment (`importlib.metadata`: each distribution's `Requires-Dist`, environment
markers and requested extras evaluated), and the sizes of the files each distribution's RECORD lists are
summed, as found on disk. So the figure is what `pip install codetune[EXTRA]` puts in site-packages with the
versions pinned in infra/constraints.txt (the shared `.venv` is installed from them), without a download:
torch is the CPU build installed here (a CUDA build is several GB more). pip, setuptools and the
interpreter itself are not counted. A requirement not installed here is named (and not counted).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
STAGE_EXTRAS = ("datasets", "intake", "models", "serving", "tuning", "export", "bridge", "all")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def top_requirements(extra: str | None) -> list[Requirement]:
    """The base requirements plus `extra`'s, with `codetune[...]` self-references expanded."""
    project = _project()
    name = canonicalize_name(project["name"])
    extras = project.get("optional-dependencies", {})
    out: list[Requirement] = [Requirement(r) for r in project["dependencies"]]
    todo, seen = [extra] if extra else [], set()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        for raw in extras[e]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == name:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def _dist(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def closure(reqs: list[Requirement]) -> tuple[dict[str, metadata.Distribution], set[str]]:
    """Installed distributions the requirements pull in (by canonical name), and the ones missing here."""
    env = default_environment()
    found: dict[str, metadata.Distribution] = {}
    missing: set[str] = set()
    done: set[tuple[str, frozenset[str]]] = set()
    todo = [(r, frozenset()) for r in reqs]
    while todo:
        req, parent_extras = todo.pop()
        if req.marker is not None and not any(
            req.marker.evaluate(env | {"extra": e}) for e in (parent_extras or {""})
        ):
            continue
        key = canonicalize_name(req.name)
        if (key, frozenset(req.extras)) in done:
            continue
        done.add((key, frozenset(req.extras)))
        dist = _dist(req.name)
        if dist is None:
            missing.add(key)
            continue
        found[key] = dist
        for raw in dist.requires or []:
            todo.append((Requirement(raw), frozenset(req.extras)))
    return found, missing


def installed_bytes(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        p = Path(str(dist.locate_file(f)))
        if p.is_file():
            total += p.stat().st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", metavar="EXTRA", help="also list the distributions of this extra, largest first")
    args = ap.parse_args()
    sizes: dict[str, int] = {}
    print(f"Python {sys.version.split()[0]}, sizes of the installed distributions (MB = 10^6 bytes)\n")
    print(f"{'install':<28}{'packages':>9}{'MB':>10}{'torch?':>8}  largest")
    base_found, _ = closure(top_requirements(None))
    rows = [("codetune (base)", None), *((f"codetune[{e}]", e) for e in STAGE_EXTRAS)]
    for label, extra in rows:
        found, missing = closure(top_requirements(extra))
        for d in found.values():
            key = canonicalize_name(d.metadata["Name"])
            sizes.setdefault(key, installed_bytes(d))
        total = sum(sizes[k] for k in found)
        largest = sorted(found, key=lambda k: -sizes[k])[:3]
        big = ", ".join(f"{k} {sizes[k] / 1e6:.0f}" for k in largest)
        torch = "yes" if "torch" in found else "no"
        print(f"{label:<28}{len(found):>9}{total / 1e6:>10.0f}{torch:>8}  {big}")
        if missing:
            print(f"{'':<28}not installed here (not counted): {', '.join(sorted(missing))}")
        if extra and extra == args.list:
            for k in sorted(found, key=lambda k: -sizes[k]):
                extra_mark = "" if k in base_found else "  (+)"
                print(f"{'':<30}{k:<32}{sizes[k] / 1e6:>8.1f}{extra_mark}")
    print("\n(+) = not in the base. The base is what every stage image has; each row includes it.")


if __name__ == "__main__":
    if not re.match(r"3\.1[1-9]", sys.version):
        raise SystemExit("needs Python 3.11+")
    main()
