"""How robustse writes files (README "Reliability"): every file is created under an unpredictable
name inside its own directory (``O_EXCL``, via :func:`tempfile.mkstemp`), written through that
open descriptor, and renamed over its final name. A reader never sees half a file, a symbolic link
at the final name is replaced (never followed, its target untouched), and on any error the
temporary file is removed. Directories robustse writes into must not be symbolic links
(:func:`own_dir`), so nothing is written outside the run directory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from robustse.core.errors import WriteError


def replace_file(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Create ``path`` atomically: ``write`` fills a binary file opened under a fresh random name in
    the same directory, which is then renamed over ``path``.

    Raises:
        WriteError: the directory cannot be written (read-only, full disk, ...); nothing is left behind.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp makes 0600; a written file gets the usual umask mode
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    """:func:`replace_file` with ``data``."""
    return replace_file(path, lambda fh: fh.write(data))


def write_text(path: Path, text: str) -> Path:
    """:func:`replace_file` with ``text`` as UTF-8; a name that is not valid UTF-8 (a folder named
    with raw bytes) is written with backslash escapes (``\\udcff``), never refused."""
    return write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


def _new_file_mode() -> int:
    """0o666 less the process's umask: the mode ``open()`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def own_dir(path: Path) -> Path:
    """``path`` as a directory robustse may write into: created if missing, refused if it is a
    symbolic link (files written there would land wherever it points) or not a directory.

    Raises:
        WriteError: a link, a file, or a directory that cannot be created.
    """
    path = Path(path)
    if path.is_symlink():
        raise WriteError(f"{path} is a symbolic link: robustse writes only into real directories; remove it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"{path}: cannot create the directory ({exc.strerror or exc})") from None
    if not path.is_dir():
        raise WriteError(f"{path} exists and is not a directory")
    return path
