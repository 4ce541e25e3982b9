"""The ``compile`` switch shared by training and sweeps: ``auto``, ``on`` or ``off``.

Where ``auto`` compiles is each caller's rule, from measurements (README "Performance"):
:func:`robustse.training.compiled.compiles_training` for training steps,
:func:`robustse.attacks.compiled.compiles_attacks` for a sweep's attack passes. The environment
variable ``ROBUSTSE_COMPILE`` (``auto``, ``on`` or ``off``) replaces ``auto`` for both, e.g. to
switch compilation off for a whole test session.
"""

from __future__ import annotations

import os
import shutil
from typing import Literal

import torch

from robustse.core.errors import DeviceError, SpecError

CompileSetting = Literal["auto", "on", "off"]
COMPILE_CHOICES: tuple[str, ...] = ("auto", "on", "off")
COMPILE_ENV = "ROBUSTSE_COMPILE"


def resolved_setting(setting: str) -> str:
    """``setting``, with ``auto`` replaced by ``$ROBUSTSE_COMPILE`` when that is set.

    Raises:
        SpecError: a setting or environment value other than auto, on, off.
    """
    if setting not in COMPILE_CHOICES:
        raise SpecError(f"compile must be one of auto, on, off (got {setting!r})")
    env = os.environ.get(COMPILE_ENV, "").strip().lower()
    if setting != "auto" or not env:
        return setting
    if env not in COMPILE_CHOICES:
        raise SpecError(f"{COMPILE_ENV}={env!r}: must be auto, on or off")
    return env


def has_cxx_compiler() -> bool:
    """Whether inductor can build CPU kernels here (it calls a C++ compiler)."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def require_compiler(device: torch.device, has_compiler: bool) -> None:
    """Refuse ``compile = on`` on a CPU without a C++ compiler (``has_compiler``: whether there is one).

    Raises:
        DeviceError: a CPU without one.
    """
    if device.type == "cpu" and not has_compiler:
        raise DeviceError("compile = on needs a C++ compiler on CPU (g++); install one, or use compile = off")
