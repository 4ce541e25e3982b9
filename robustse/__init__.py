"""robustse: does Squeeze-and-Excitation gating damp adversarial perturbations?

The public API (stable names)::

    import robustse as rs
    rs.list_models("*resnet*")
    model = rs.create_model("se_resnet20", num_classes=10, in_channels=1)
    ds = rs.load_dataset("fashion-mnist", split="test")
    rs.save_checkpoint(model, path, meta={...}); model, meta = rs.load_checkpoint(path)
    gates = rs.find_gates(model)
    res = rs.create_attack("pgd", norm="linf", steps=10)(model, x, y, epsilons=[0.0, 0.03])
"""

from ._version import __version__
from .attacks import create_attack, list_attacks
from .checkpoint import load_checkpoint, save_checkpoint
from .data import list_datasets, load_dataset
from .data_base import Dataset
from .device import tune_allocator
from .errors import RobustseError
from .models import create_model, list_models
from .models.gates import find_blocks, find_gates
from .pipeline import run_experiment
from .probes import capture

__all__ = [
    "Dataset",
    "RobustseError",
    "__version__",
    "capture",
    "create_attack",
    "create_model",
    "find_blocks",
    "find_gates",
    "list_attacks",
    "list_datasets",
    "list_models",
    "load_checkpoint",
    "load_dataset",
    "run_experiment",
    "save_checkpoint",
    "tune_allocator",
]
