"""robustse: does Squeeze-and-Excitation gating damp adversarial perturbations?

The public API (stable names)::

    import robustse as rs
    rs.list_models("*resnet*")
    model = rs.create_model("se_resnet20", num_classes=10, in_channels=1)
    ds = rs.load_dataset("fashion-mnist", split="test")
    rs.save_checkpoint(model, path, meta={...}); model, meta = rs.load_checkpoint(path)
    gates = rs.find_gates(model)
    res = rs.create_attack("pgd", norm="linf", steps=10)(model, x, y, epsilons=[0.0, 0.03])

Names are loaded on first use (PEP 562), so ``import robustse`` (and ``robustse --help``,
``robustse report``) does not load torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from robustse._version import __version__

# public name → the module that defines it
_API = {
    "Dataset": "robustse.data.base",
    "RobustseError": "robustse.core.errors",
    "capture": "robustse.probes.capture",
    "create_attack": "robustse.attacks.engine",
    "create_model": "robustse.models.registry",
    "find_blocks": "robustse.models.gates",
    "find_gates": "robustse.models.gates",
    "list_attacks": "robustse.attacks.engine",
    "list_datasets": "robustse.data.datasets",
    "list_models": "robustse.models.registry",
    "load_checkpoint": "robustse.models.checkpoint",
    "load_dataset": "robustse.data.datasets",
    "run_experiment": "robustse.experiment.pipeline",
    "save_checkpoint": "robustse.models.checkpoint",
    "tune_allocator": "robustse.core.allocator",
}

__all__ = [
    "Dataset", "RobustseError", "__version__", "capture", "create_attack", "create_model", "find_blocks",
    "find_gates", "list_attacks", "list_datasets", "list_models", "load_checkpoint", "load_dataset",
    "run_experiment", "save_checkpoint", "tune_allocator",
]  # fmt: skip

if TYPE_CHECKING:
    from robustse.attacks.engine import create_attack, list_attacks
    from robustse.core.allocator import tune_allocator
    from robustse.core.errors import RobustseError
    from robustse.data.base import Dataset
    from robustse.data.datasets import list_datasets, load_dataset
    from robustse.experiment.pipeline import run_experiment
    from robustse.models.checkpoint import load_checkpoint, save_checkpoint
    from robustse.models.gates import find_blocks, find_gates
    from robustse.models.registry import create_model, list_models
    from robustse.probes.capture import capture


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'robustse' has no attribute {name!r}")
    if module == "robustse.models.registry":
        importlib.import_module("robustse.models")  # registers the built-in families first
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
