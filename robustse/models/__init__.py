"""Model zoo: plain/SE twin families (plus static-gate controls) behind one registry, and torchvision."""

from robustse.models import cnn as _cnn  # noqa: F401  (registers [se_|static_]cnn, [se_|static_]small_cnn)
from robustse.models import resnet as _resnet  # noqa: F401  (registers [se_|static_]resnet20)
from robustse.models.layers import Block, Classifier, Normalize, SEBlock, StaticGate, se_hidden
from robustse.models.registry import (
    ModelInfo,
    ModelKind,
    create_model,
    family_members,
    list_models,
    model_arch,
    model_info,
    register_model,
)

__all__ = [
    "Block",
    "Classifier",
    "ModelInfo",
    "ModelKind",
    "Normalize",
    "SEBlock",
    "StaticGate",
    "create_model",
    "family_members",
    "list_models",
    "model_arch",
    "model_info",
    "register_model",
    "se_hidden",
]
