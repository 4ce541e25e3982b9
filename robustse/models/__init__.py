"""Model zoo: twin plain/SE families behind one registry, plus torchvision classifiers."""

from . import cnn as _cnn  # noqa: F401  (registers cnn, se_cnn, small_cnn, se_small_cnn)
from . import resnet as _resnet  # noqa: F401  (registers resnet20, se_resnet20)
from .layers import Block, Classifier, Normalize, SEBlock, se_hidden
from .registry import ModelInfo, create_model, list_models, model_arch, model_info, register_model

__all__ = [
    "Block",
    "Classifier",
    "ModelInfo",
    "Normalize",
    "SEBlock",
    "create_model",
    "list_models",
    "model_arch",
    "model_info",
    "register_model",
    "se_hidden",
]
