"""A key for what a module would make: its code and the data it works from.

A cache (a prepared image, a cached disk) keyed by fingerprint(modules) is
rebuilt whenever the code or a data table of those modules changes, with no
version number to bump by hand. The code counts as its syntax tree without
docstrings, so comments, docstrings and formatting do not rebuild anything.
The data counts as the runtime values of the module's upper-case constants
(tables of dataclasses, tuples, dicts, strings), serialised canonically: what
a constant holds at run time is what shapes the output, whatever built it.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import hashlib
import json
import re
import types
from pathlib import PurePath

# Module-level names that hold data: UPPER_CASE, also _PRIVATE_UPPER.
CONSTANT = re.compile(r"_*[A-Z][A-Z0-9_]*")


def fingerprint(*modules: types.ModuleType) -> str:
    """16 hex digits that change when any module's code or constants change."""
    parts = [[module.__name__, code_digest(module.__file__ or ""), constants(module)] for module in modules]
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.cache
def code_digest(path: str) -> str:
    """sha256 of a source file's syntax tree, docstrings left out (comments never are in it)."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def constants(module: types.ModuleType) -> dict[str, object]:
    """The module's upper-case constants, as canonical JSON-able values."""
    return {
        name: canonical(value, f"{module.__name__}.{name}")
        for name, value in vars(module).items()
        if CONSTANT.fullmatch(name) and not isinstance(value, types.ModuleType)
    }


def canonical(value: object, where: str = "value") -> object:
    """A JSON-able form of `value` that is equal exactly when the values are.

    TypeError for a kind of value it cannot serialise faithfully (better than a
    key that silently misses a change).
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return {"float": value.hex()}
    if isinstance(value, enum.Enum):
        return {"enum": _qualname(type(value)), "value": canonical(value.value, where)}
    if isinstance(value, bytes | bytearray):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, PurePath):
        return {"path": str(value)}
    if isinstance(value, re.Pattern):
        return {"re": canonical(value.pattern, where), "flags": value.flags}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: canonical(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
        return {"dataclass": _qualname(type(value)), "fields": fields}
    if isinstance(value, tuple | list):
        return {type(value).__name__: [canonical(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, dict):
        items = [[canonical(k, where), canonical(v, f"{where}[{k!r}]")] for k, v in value.items()]
        return {"dict": sorted(items, key=_sort_key)}
    if isinstance(value, set | frozenset):
        return {"set": sorted((canonical(item, where) for item in value), key=_sort_key)}
    if isinstance(value, type):
        return {"type": _qualname(value)}
    if isinstance(value, functools.partial):
        return {"partial": canonical(value.func, where), "args": canonical(value.args, where), "keywords": canonical(value.keywords, where)}
    if isinstance(value, types.FunctionType):
        # Its code is in its module's tree; what a closure captured is data.
        cells = [canonical(cell.cell_contents, f"{where}.<closure>") for cell in value.__closure__ or ()]
        return {"function": _qualname(value), "closure": cells, "defaults": canonical(value.__defaults__ or (), where)}
    if isinstance(value, types.MethodType):
        return {"method": _qualname(value), "self": canonical(value.__self__, where)}
    if isinstance(value, types.BuiltinFunctionType):
        return {"builtin": _qualname(value)}
    raise TypeError(f"fingerprint: cannot serialise {where} ({type(value).__name__}); give it a canonical form")


def _qualname(thing: object) -> str:
    return f"{getattr(thing, '__module__', '')}.{getattr(thing, '__qualname__', repr(thing))}"


def _sort_key(item: object) -> str:
    return json.dumps(item, sort_keys=True)
