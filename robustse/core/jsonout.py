"""Strict JSON for every ``--json`` output: NaN and ±inf become ``null`` (strict parsers reject
the bare ``NaN`` token Python's json module writes by default), numpy scalars become numbers,
anything else unknown its text."""

from __future__ import annotations

import json
import math
from typing import Any


def plain(value: Any) -> Any:
    """``value`` as plain JSON data: dicts, lists, str, int, finite float, bool or None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy and torch scalars
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def dumps(value: Any, *, indent: int | None = 2) -> str:
    """Strict JSON text of ``value`` (never a NaN or Infinity token)."""
    return json.dumps(plain(value), indent=indent, allow_nan=False)
