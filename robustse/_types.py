"""Small shared types."""

from __future__ import annotations

from pathlib import Path

PathLike = str | Path
