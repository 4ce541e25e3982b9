"""Strict TOML for frozen dataclasses: build a dataclass from a parsed table, refusing unknown keys
(listing the valid ones), wrong types and bad values with one line naming the key; and write the
simple nested tables of a spec back as TOML."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from robustse.core.errors import SpecError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp``; return it converted (lists → tuples)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, tp, where)
    if origin is Literal:
        return _convert_literal(value, tp, where)
    if origin is tuple:
        return _convert_tuple(value, tp, where)
    if origin is dict:
        return dict(_table(value, where))
    if dataclasses.is_dataclass(tp):
        return from_mapping(typing.cast(type, tp), _table(value, where), where=where)
    return _convert_scalar(value, tp, where)


def _mismatch(value: Any, tp: Any, where: str) -> SpecError:
    return SpecError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _convert_union(value: Any, tp: Any, where: str) -> Any:
    """``X | Y | None``: None if allowed, else the first option that accepts ``value``."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # Optional[X]: X's own, more precise, error message
        return _convert(value, options[0], where)
    for arg in options:
        try:
            return _convert(value, arg, where)
        except SpecError:
            continue
    raise _mismatch(value, tp, where)


def _convert_literal(value: Any, tp: Any, where: str) -> Any:
    if value in typing.get_args(tp):
        return value
    choices = ", ".join(repr(a) for a in typing.get_args(tp))
    raise SpecError(f"{where}: {value!r} is not one of {choices}")


def _convert_tuple(value: Any, tp: Any, where: str) -> tuple[Any, ...]:
    """A TOML list (or tuple) → a tuple, each item checked against the item type."""
    if not isinstance(value, (list, tuple)):
        raise _mismatch(value, tp, where)
    (item_tp, *_rest) = typing.get_args(tp)
    return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
    return value


# bool is an int in Python but never a valid TOML integer or float here
_SCALARS: dict[type, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _convert_scalar(value: Any, tp: Any, where: str) -> Any:
    """bool, int, float (an int is accepted and converted) or str."""
    accepts = _SCALARS.get(tp)
    if accepts is None:  # pragma: no cover - a dataclass field of a type this loader does not know
        raise TypeError(f"unsupported config type {tp!r}")
    if not accepts(value):
        raise _mismatch(value, tp, where)
    return float(value) if tp is float else value


def from_mapping(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` strictly.

    Raises:
        SpecError: on an unknown key (listing the valid ones), a wrong type or a bad value.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    prefix = f"{where}." if where else ""
    for key, value in data.items():
        if key not in fields:
            valid = ", ".join(sorted(fields))
            raise SpecError(f"unknown key '{prefix}{key}' (valid: {valid})")
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def dump_toml(data: dict[str, Any]) -> str:
    """Write the simple nested structure of a spec as TOML (scalars, lists, tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    tables = []
    for k, v in data.items():
        if isinstance(v, dict):
            body = [f"{kk} = {value(vv)}" for kk, vv in v.items() if vv is not None]
            tables.append(f"[{k}]\n" + "\n".join(body))
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"
