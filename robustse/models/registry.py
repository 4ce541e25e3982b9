"""Model registry: builder functions behind one front door, :func:`create_model`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ModelError
from ..registry import Registry
from .layers import Gate, Squeeze

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """A registered architecture.

    Attributes:
        name: registry name.
        builder: keyword-only function returning the model.
        family: the twin pair it belongs to (the plain name).
        has_se: whether it carries SE blocks.
        description: one line for ``robustse models``.
    """

    name: str
    builder: Builder
    family: str
    has_se: bool
    description: str

    @property
    def twin(self) -> str:
        """The other member of the pair (``resnet20`` ↔ ``se_resnet20``)."""
        return self.family if self.has_se else f"se_{self.family}"

    def options(self) -> dict[str, Any]:
        """Keyword options of the builder with their defaults."""
        sig = inspect.signature(self.builder)
        return {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


_REGISTRY: Registry[ModelInfo] = Registry("architecture", ModelError, hint="or torchvision:<name>")


def register_model(name: str, *, family: str, description: str) -> Callable[[Builder], Builder]:
    """Register a builder. SE twins are named ``se_<family>``; the plain twin is ``<family>``.

    Raises:
        ValueError: if ``name`` is already registered (a programming error, not user input).
    """

    def deco(fn: Builder) -> Builder:
        has_se = name != family
        if has_se and name != f"se_{family}":
            raise ValueError(f"SE twin of {family!r} must be named 'se_{family}', not {name!r}")
        _REGISTRY.add(name, ModelInfo(name, fn, family, has_se, description))
        return fn

    return deco


def register_twins(
    family: str,
    build: Callable[..., nn.Module],
    *,
    description: str,
    se_description: str,
    reduction: int = 16,
) -> None:
    """Register ``family`` and ``se_<family>`` from one builder, so the twins differ only in SE.

    ``build(num_classes=, in_channels=, mean=, std=, se=)`` gets ``se=None`` for the plain twin
    and the SE options dict for the SE twin.
    """

    def plain(
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> nn.Module:
        return build(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, se=None)

    def with_se(
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        reduction: int = reduction,
        squeeze: Squeeze = "avg",
        gate: Gate = "sigmoid",
    ) -> nn.Module:
        se = {"reduction": reduction, "squeeze": squeeze, "gate": gate}
        return build(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, se=se)

    register_model(family, family=family, description=description)(plain)
    register_model(f"se_{family}", family=family, description=se_description)(with_se)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern, e.g. ``"*resnet*"``."""
    return _REGISTRY.names(pattern)


def model_info(name: str) -> ModelInfo:
    """Registry entry of ``name``.

    Raises:
        ModelError: unknown name, listing the valid ones.
    """
    return _REGISTRY.get(name)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by registry name (or ``torchvision:<name>``).

    Args:
        name: e.g. ``se_resnet20``.
        **kwargs: builder options: ``num_classes``, ``in_channels``, ``mean``, ``std`` and, for SE
            models, ``reduction``, ``squeeze``, ``gate``.

    Returns:
        The model (train mode, freshly initialized).

    Raises:
        ModelError: unknown name or option.

    Example:
        >>> model = create_model("se_resnet20", num_classes=10, in_channels=1)
    """
    if name.startswith("torchvision:"):
        from .external import create_torchvision_model

        model: nn.Module = create_torchvision_model(name.split(":", 1)[1], **kwargs)
    else:
        info = model_info(name)
        valid = info.options()
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ModelError(f"{name}: unknown option {unknown[0]!r} (valid: {', '.join(valid)})")
        model = info.builder(**kwargs)
    # Remember how the model was built, so a checkpoint can rebuild it (see checkpoint.py).
    model.robustse_arch = name  # type: ignore[assignment]
    model.robustse_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}  # type: ignore[assignment]
    return model


def model_arch(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """(registry name, builder kwargs) recorded by :func:`create_model`.

    Raises:
        ModelError: if the model was not built by :func:`create_model`.
    """
    arch = getattr(model, "robustse_arch", None)
    if arch is None:
        raise ModelError("model was not built by create_model: pass meta={'arch': ..., 'arch_kwargs': ...}")
    return str(arch), dict(getattr(model, "robustse_kwargs", {}))
