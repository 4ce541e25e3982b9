"""Where a result came from: library versions (stored in every checkpoint), the git commit, and the
run's machine (``manifest.json`` of an experiment, README "Set-up: two commands on a fresh machine")."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from robustse._version import __version__
from robustse.core.distributed import SINGLE, Dist


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries results depend on."""
    import numpy
    import torchvision

    return {
        "robustse": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def git_commit() -> str | None:
    """The commit of the robustse checkout, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_provenance(device: torch.device | str, layout: Dist = SINGLE) -> dict[str, Any]:
    """Versions, git commit, device, world size and threads of this run."""
    return {
        "versions": library_versions(),
        "git_commit": git_commit(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
        "world_size": layout.world,
        "threads": torch.get_num_threads(),
    }
