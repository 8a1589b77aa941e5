"""Command-line options made from `events.payloads.Hyperparameters`, plus `--config FILE`.

`codetune tune` and `codetune pipeline` both take `@hyperparameter_options`: one option per field of the
model (name, type, default, description and constraints all read from the field), so the two commands
cannot drift from each other or from the payload. Every option defaults to "not given"; the values are
merged as: model defaults < `--config FILE` (YAML, JSON or TOML, Axolotl-style: a mapping of field
names) < options given on the command line, and validated once by the model, so a bad value — from
the file or the command line — is refused with one line that names the field.
"""

from __future__ import annotations

import inspect
import json
import tomllib
import types
import typing
from collections.abc import Callable, Set
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from events.payloads import Hyperparameters
from infra.flows import FlowError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".toml")
_HP_PARAM = "hyperparameters"


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _constraints(info: FieldInfo) -> str:
    words = []
    for m in info.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            if getattr(m, attr, None) is not None:
                words.append(f"{sign}{getattr(m, attr)}")
    return ", ".join(words)


def _default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    else:
        value = info.default
    if isinstance(value, list):
        return ",".join(value)
    return "unset" if value is None else str(value)


def _option(field: str, info: FieldInfo) -> tuple[Any, Any]:
    """(annotation, typer.Option) for one field. Lists and 'all-linear' (target_modules) are a comma list."""
    ann = info.annotation
    args = [a for a in get_args(ann) if a is not type(None)] if get_origin(ann) in (typing.Union, types.UnionType) \
        else [ann]
    help_text = info.description or field.replace("_", " ")
    limits = _constraints(info)
    extra: dict[str, Any] = {}
    if len(args) == 1 and args[0] is bool:
        decls = [f"{option_name(field)}/--no-{field.replace('_', '-')}"]
        py: Any = bool
    elif len(args) == 1 and args[0] in (int, float):
        decls = [option_name(field)]
        py = args[0]
    elif len(args) == 1 and get_origin(args[0]) is Literal:
        decls = [option_name(field)]
        py = str
        extra["metavar"] = "|".join(str(v) for v in get_args(args[0]))  # checked by the model: names the field
    else:  # list[str] | Literal["all-linear"]
        decls = [option_name(field)]
        py = str
        help_text += " (comma-separated, or 'all-linear')"
    if limits:
        help_text += f" [{limits}]"
    return py | None, typer.Option(None, *decls, help=help_text, show_default=_default_text(info),
                                   rich_help_panel="Hyperparameters", **extra)


def _cli_value(field: str, value: Any) -> Any:
    if field == "target_modules" and isinstance(value, str):
        return value if value == "all-linear" else [m.strip() for m in value.split(",") if m.strip()]
    return value


def hyperparameter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give a Typer command one option per Hyperparameters field and `--config FILE`; the command receives
    them merged and validated as `hyperparameters: Hyperparameters` (its own parameter of that name)."""
    sig = inspect.signature(func)
    hints = typing.get_type_hints(func)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
           if p.name != _HP_PARAM]
    taken = {p.name for p in own}
    fields = {n: f for n, f in Hyperparameters.model_fields.items() if n not in taken}
    added = []
    for n, info in fields.items():
        ann, opt = _option(n, info)
        added.append(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann))
    config = inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
        default=typer.Option(None, "--config", exists=True, dir_okay=False, rich_help_panel="Hyperparameters",
                             help="a YAML, JSON or TOML file of hyperparameters (field: value); "
                                  "options given on the command line override it"))

    def command(**kwargs: Any) -> Any:
        given = {n: kwargs.pop(n) for n in fields}
        hp = build_hyperparameters(kwargs.pop("config"), given)
        return func(**kwargs, **{_HP_PARAM: hp})

    params = [*own, *added, config]
    command.__name__ = func.__name__
    command.__doc__ = func.__doc__
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def load_config(path: Path) -> dict[str, Any]:
    """A mapping of Hyperparameters fields from a .yaml/.yml (PyYAML), .json or .toml (tomllib) file."""
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise FlowError(f"{path.name}: reading YAML needs PyYAML; use a .json or .toml file") \
                    from None
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise FlowError(f"{path.name}: a config file ends in {', '.join(CONFIG_SUFFIXES)}")
    except FlowError:
        raise
    except Exception as e:  # the parsers' own errors say where (line, column)
        raise FlowError(f"{path.name} is not valid {suffix[1:].upper()}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FlowError(f"{path.name}: expected a mapping of hyperparameters (field: value), "
                        f"got {type(data).__name__}")
    return data


def build_hyperparameters(config: Path | None, given: dict[str, Any]) -> Hyperparameters:
    """Model defaults < the config file < options given; one validation, errors name the field (and file)."""
    from_file = load_config(config) if config else {}
    cli = {n: _cli_value(n, v) for n, v in given.items() if v is not None}
    try:
        return Hyperparameters.model_validate(from_file | cli)
    except ValidationError as e:
        raise FlowError(describe(e, set(from_file) - set(cli), config)) from None


def describe(e: ValidationError, from_file: Set[str] = frozenset(), config: Path | None = None) -> str:
    """One line: `field: what is wrong (got VALUE)` for each error; fields from the file say so."""
    parts = []
    for err in e.errors()[:5]:
        loc = [str(x) for x in err["loc"] if not isinstance(x, int) and x not in ("list[str]", "literal['all-linear']")]
        field = ".".join(loc) or "hyperparameters"
        where = f" (in {config.name})" if config and loc and loc[0] in from_file else ""
        got = f" (got {err['input']!r})" if err["type"] != "extra_forbidden" and "input" in err else ""
        what = "not a hyperparameter" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{field}{where}: {what}{got}")
    return "; ".join(parts)
