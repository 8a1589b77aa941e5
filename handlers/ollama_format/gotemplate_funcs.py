"""The functions of Ollama's Go templates: Go's text/template builtins (and or not eq ne lt le gt ge len index
slice print printf println) plus Ollama's `json`, with Go's formatting of values (`%v`, `<no value>`, …).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any


class TemplateError(ValueError):
    """A Go template outside the supported subset, malformed, or failing at execution."""


def truth(v: Any) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (int, float, str, list, tuple, dict)):
        return bool(v)
    return True


def go_str(v: Any) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(go_str(x) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{go_str(v[k])}" for k in sorted(v)) + "]"
    return str(v)


def go_json(v: Any) -> str:
    out = json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    return out.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def sprint(*args: Any) -> str:
    out = ""
    for i, a in enumerate(args):
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out += " "
        out += go_str(a)
    return out


_VERB_RE = re.compile(r"%([-+# 0]*)(\*|\d+)?(?:\.(\*|\d*))?([a-zA-Z%])")


def _format_one(verb: str, flags: str, v: Any, prec: int | None) -> str:
    """One Go fmt verb applied to `v` (no width: the caller pads)."""
    if verb in "sv":
        text = go_str(v)
        return text[:prec] if prec is not None and verb == "s" else text
    if verb == "q":
        return json.dumps(go_str(v), ensure_ascii=False)
    if verb == "t":
        return go_str(v) if isinstance(v, bool) else f"%!t({go_type(v)}={go_str(v)})"
    if verb == "c" and isinstance(v, int) and not isinstance(v, bool):
        return chr(v)
    if verb in "dxXob" and isinstance(v, int) and not isinstance(v, bool):
        sign = "+" if "+" in flags and v >= 0 else (" " if " " in flags and v >= 0 else "")
        digits = {"d": "d", "x": "x", "X": "X", "o": "o", "b": "b"}[verb]
        body = format(abs(v), digits)
        prefix = {"x": "0x", "X": "0X", "o": "0", "b": "0b"}.get(verb, "") if "#" in flags else ""
        return ("-" if v < 0 else sign) + prefix + body
    if verb in "feEgG" and isinstance(v, (int, float)) and not isinstance(v, bool):
        spec = ("+" if "+" in flags else "") + (f".{prec}" if prec is not None else (".6" if verb in "feE"
                                                                                    else "")) + verb
        return format(float(v), spec)
    return f"%!{verb}({go_type(v)}={go_str(v)})"


def printf(fmt: str, *args: Any) -> str:
    """Go's fmt.Sprintf for the verbs templates use: %s %v %q %d %x %X %o %b %c %t %f %e %g and %%,
    with flags (- + # space 0), width and precision, either of them `*` (taken from the arguments)."""
    it = iter(args)
    missing = object()

    def sub(m: re.Match[str]) -> str:
        flags, width_s, prec_s, verb = m.groups()
        if verb == "%":
            return "%"
        width: int | None = None
        prec: int | None = None
        bad = ""
        if width_s == "*":
            w = next(it, missing)
            if isinstance(w, int) and not isinstance(w, bool):
                width = w
                if width < 0:
                    flags, width = flags + "-", -width
            else:
                bad += "%!(BADWIDTH)"
        elif width_s:
            width = int(width_s)
        if prec_s == "*":
            pv = next(it, missing)
            if isinstance(pv, int) and not isinstance(pv, bool):
                prec = max(pv, 0)
            else:
                bad += "%!(BADPREC)"
        elif prec_s is not None:
            prec = int(prec_s or 0)
        v = next(it, missing)
        if v is missing:
            return f"{bad}%!{verb}(MISSING)"
        text = bad + _format_one(verb, flags, v, prec)
        if width is not None and len(text) < width:
            pad = width - len(text)
            if "-" in flags:
                text += " " * pad
            elif "0" in flags and verb in "dxXobfeEgG" and not isinstance(v, str):
                sign = text[0] if text[:1] in "+- " else ""
                text = sign + "0" * pad + text[len(sign):]
            else:
                text = " " * pad + text
        return text

    out = _VERB_RE.sub(sub, fmt)
    extra = list(it)
    if extra:
        out += "%!(EXTRA " + ", ".join(f"{go_type(x)}={go_str(x)}" for x in extra) + ")"
    return out


def _index(v: Any, *keys: Any) -> Any:
    for k in keys:
        try:
            v = v.get(k) if isinstance(v, Mapping) else v[k]
        except (IndexError, TypeError, KeyError) as e:
            raise TemplateError(f"index of {type(v).__name__}: {e}") from e
    return v


def _slice(v: Any, *bounds: int) -> Any:
    if len(bounds) > 2:
        raise TemplateError("slice: too many indices for a string or list")
    start = bounds[0] if bounds else 0
    end = bounds[1] if len(bounds) > 1 else len(v)
    if not 0 <= start <= end <= len(v):
        raise TemplateError(f"slice: index out of range [{start}:{end}] with length {len(v)}")
    return v[start:end]


def _cmp(op: str) -> Callable[[Any, Any], bool]:
    def f(a: Any, b: Any) -> bool:
        try:
            return {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[op]
        except TypeError as e:
            raise TemplateError(f"{op}: incompatible types for comparison") from e

    return f


FUNCS: dict[str, Callable[..., Any]] = {
    "not": lambda v: not truth(v),
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "lt": _cmp("lt"), "le": _cmp("le"), "gt": _cmp("gt"), "ge": _cmp("ge"),
    "len": lambda v: len(v),
    "index": _index,
    "slice": _slice,
    "print": sprint,
    "printf": printf,
    "println": lambda *a: " ".join(go_str(x) for x in a) + "\n",
    "json": go_json,
}



def go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "[]interface {}"
    return "interface {}"
