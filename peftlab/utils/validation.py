"""Check a config's field values against the types its dataclass declares, before anything uses them.

``LoraConfig(lora_alpha="16")`` would otherwise be accepted and fail later deep inside the model
(``unsupported operand type(s) for /``), and ``lora_alpha=float("nan")`` would silently give a model that
outputs NaN. :func:`check_field_types` refuses such values at construction, naming the field, the type
it expects and its default: ``TypeError: LoraConfig(lora_alpha='16'): expected a number; the default is 8``.

Explained in: book/reliability.ipynb
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, Literal, Union

_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _CACHE:
        _CACHE[cls] = typing.get_type_hints(cls)  # each field's annotation resolved in its own class's module
    return _CACHE[cls]


def _describe(tp: Any, field: str = "") -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "None"
    if tp is bool:
        return "True or False"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a, field) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, set, frozenset):
        args = typing.get_args(tp)
        if args and args[0] is str and "modules" in field:
            return "a list of module names"  # target_modules, exclude_modules, modules_to_save
        return f"a list (items: {_describe(args[0])})" if args else "a list"
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        return f"a dict (keys: {_describe(args[0])}; values: {_describe(args[1])})" if args else "a dict"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False
        args = typing.get_args(tp)
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(tp)
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return isinstance(value, tp) or value in {m.value for m in tp}
        return isinstance(value, tp)
    return True  # a form this checker does not know: leave it to the config's own checks


def check_field_types(config: Any) -> None:
    """Raise for the first field whose value does not fit its declared type: ``TypeError`` for a wrong type,
    ``ValueError`` for NaN/inf or a string outside a ``Literal``'s choices.

    Explained in: book/reliability.ipynb
    """
    cls = type(config)
    hints = _hints(cls)
    for f in dataclasses.fields(config):
        tp = hints.get(f.name, Any)
        value = getattr(config, f.name)
        if _matches(value, tp):
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "none"
        what = _describe(tp, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            error, what = ValueError, "a finite number" if what == "a number" else f"a finite value: {what}"
        elif isinstance(value, (str, int, float)) and "one of " in what:  # right kind, value not among the choices
            error = ValueError
        elif isinstance(value, float) and _matches(1, tp) and not _matches(1.5, tp):  # r=2.5: a number, not whole
            error = ValueError
        else:
            error = TypeError
        raise error(f"{cls.__name__}({f.name}={value!r}): expected {what}; the default is {default}")
