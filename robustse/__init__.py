"""robustse: does Squeeze-and-Excitation gating damp adversarial perturbations?

The public API (stable names)::

    import robustse as rs
    rs.list_models("*resnet*")
    model = rs.create_model("se_resnet20", num_classes=10, in_channels=1)
    ds = rs.load_dataset("fashion-mnist", split="test")
    rs.save_checkpoint(model, path, meta={...}); model, meta = rs.load_checkpoint(path)
    gates = rs.find_gates(model)
    res = rs.create_attack("pgd", norm="linf", steps=10)(model, x, y, epsilons=[0.0, 0.03])
    @rs.register_attack("my_attack", role="attack")   # a subclass of rs.Attack: --attack my_attack

Names are loaded on first use (PEP 562), so ``import robustse`` (and ``robustse --help``,
``robustse report``) does not load torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from robustse._version import __version__

# public name → the module that defines it
_API = {
    "Attack": "robustse.attacks.base",
    "AttackResult": "robustse.attacks.base",
    "Dataset": "robustse.data.base",
    "RobustseError": "robustse.core.errors",
    "capture": "robustse.probes.capture",
    "create_attack": "robustse.attacks.registry",
    "create_model": "robustse.models.registry",
    "find_blocks": "robustse.models.gates",
    "find_gates": "robustse.models.gates",
    "list_attacks": "robustse.attacks.registry",
    "list_datasets": "robustse.data.datasets",
    "list_models": "robustse.models.registry",
    "load_plugin": "robustse.attacks.registry",
    "load_checkpoint": "robustse.models.checkpoint",
    "load_dataset": "robustse.data.datasets",
    "run_experiment": "robustse.experiment.pipeline",
    "register_attack": "robustse.attacks.registry",
    "save_checkpoint": "robustse.models.checkpoint",
    "tune_allocator": "robustse.core.allocator",
}

__all__ = [
    "Attack", "AttackResult", "Dataset", "RobustseError", "__version__", "capture", "create_attack", "create_model",
    "find_blocks", "find_gates", "list_attacks", "list_datasets", "list_models", "load_checkpoint", "load_dataset",
    "load_plugin", "register_attack", "run_experiment", "save_checkpoint", "tune_allocator",
]  # fmt: skip

if TYPE_CHECKING:
    from robustse.attacks.base import Attack, AttackResult
    from robustse.attacks.registry import create_attack, list_attacks, load_plugin, register_attack
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
    if module.startswith(("robustse.models.", "robustse.attacks.")):  # registers the built-in families first
        importlib.import_module(module.rsplit(".", 1)[0])
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
