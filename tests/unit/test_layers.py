"""The layers point one way (README "Architecture"): infra → handlers → events/storage → core.

Every module's imports are read with `ast` (function-level imports included, since lazy imports are how
stages stay light), and each arrow is checked against the rules below. A failure lists every violation.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = {"core", "events", "storage", "handlers", "infra", "tests", "bench"}

# handlers/: the pipeline stages, and what sits beside them
STAGES = {"datasets", "intake", "models", "tuning", "export", "serving", "ollama"}
SHARED = {"common", "report", "ollama_format", "ollama_ops", "metrics"}  # shared handler modules any stage may import
COMPOSERS = {"app", "bridge", "contract"}  # compose stages (process, HTTP front, contract table)

# Sibling-stage imports allowed, each with the work that removes it; an entry that no longer occurs fails the
# test, so the list cannot go stale. Empty: no stage imports a sibling.
ALLOWED_SIBLING_IMPORTS: set[tuple[str, str]] = set()


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth; `from a import b` yields `a.b`
    (b may be a module), relative imports resolved against the file's package."""
    mod = module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{a.name}" if a.name != "*" else base) for a in node.names]
    return found


def violation(src: str, dst: str) -> str | None:
    """Why `src` may not import `dst` (None when it may)."""
    s, d = src.split("."), dst.split(".")
    if d[0] not in OURS or (d[0] == s[0] and s[0] != "handlers"):
        return None
    if d[0] in {"tests", "bench"}:
        return "shipped code imports tests/bench"
    if s[0] == "core":
        return "core/ imports nothing of ours"
    if s[0] == "events":
        return None if d[0] == "core" else "events/ imports only core/"
    if s[0] == "storage":
        return None if d[0] in {"core", "events"} else "storage/ imports only core/ and events/"
    if s[0] == "handlers":
        if d[0] == "infra":
            return "handlers/ never import infra/ (entry points sit above them)"
        if d[0] != "handlers" or len(d) < 2 or len(s) < 2:
            return None
        mine, theirs = s[1], d[1]
        if theirs == mine or theirs in SHARED:
            return None
        if mine in COMPOSERS:
            return None
        if theirs in COMPOSERS:
            return f"a stage imports the {theirs} composer"
        if theirs in STAGES:
            return None if (src, ".".join(d[:3])) in ALLOWED_SIBLING_IMPORTS else "a stage imports a sibling stage"
        return f"unknown handlers package {theirs!r}: name it in STAGES, SHARED or COMPOSERS"
    return None  # infra/ is the top: it may import any layer


def shipped_modules() -> list[Path]:
    return sorted(p for layer in ("core", "events", "storage", "handlers", "infra")
                  for p in (ROOT / layer).rglob("*.py"))


def test_every_import_points_down() -> None:
    problems = []
    for path in shipped_modules():
        src = module_name(path)
        for line, dst in imports_of(path):
            why = violation(src, dst)
            if why:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {dst} — {why}")
    assert not problems, "layer violations (README 'Architecture'):\n  " + "\n  ".join(problems)


def test_sibling_allowlist_has_no_stale_entries() -> None:
    seen = {(module_name(p), ".".join(dst.split(".")[:3])) for p in shipped_modules() for _, dst in imports_of(p)}
    stale = sorted(ALLOWED_SIBLING_IMPORTS - seen)
    assert not stale, f"remove these from ALLOWED_SIBLING_IMPORTS (no longer imported): {stale}"


def test_the_checker_catches_each_kind_of_violation(tmp_path: Path) -> None:
    """The rules themselves: each forbidden arrow is reported, each allowed one is not."""
    assert violation("core.settings", "events.payloads")
    assert violation("events.payloads", "storage.keys")
    assert violation("storage.objects", "handlers.common")
    assert violation("handlers.models.service", "infra.stack")
    assert violation("handlers.serving.service", "handlers.export.gguf")
    assert violation("handlers.tuning.runner", "handlers.bridge.app")
    assert violation("handlers.datasets.service", "tests.conftest")
    for ok in [("storage.documents", "events.payloads"), ("events.payloads", "core.keys"),
               ("handlers.export.gguf", "handlers.export.llamacpp"), ("handlers.tuning.router", "handlers.common"),
               ("handlers.bridge.routes.models", "handlers.models.service"), ("infra.cli", "handlers.app"),
               ("core.settings", "pydantic_settings")]:
        assert violation(*ok) is None, ok
    # function-level and relative imports are seen too
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    mod = pkg / "m.py"
    mod.write_text("def f():\n    from .sub import x\n    import infra.stack\n")
    assert imports_of(mod, tmp_path) == [(2, "pkg.sub.x"), (3, "infra.stack")]
