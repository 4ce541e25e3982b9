"""Model registry: builder functions behind one front door, :func:`create_model`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from robustse.core.errors import ModelError
from robustse.core.registry import Registry
from robustse.models.layers import Gate, Squeeze

Builder = Callable[..., nn.Module]
ModelKind = Literal["plain", "se", "static"]
KIND_PREFIX: dict[ModelKind, str] = {"plain": "", "se": "se_", "static": "static_"}


@dataclass(frozen=True)
class ModelInfo:
    """A registered architecture.

    Attributes:
        name: registry name.
        builder: keyword-only function returning the model.
        family: the group it belongs to (the plain name).
        kind: ``plain`` (``<family>``), ``se`` (``se_<family>``, SE blocks) or ``static``
            (``static_<family>``, a learned input-independent channel scale in the SE blocks' places).
        description: one line for ``robustse models``.
    """

    name: str
    builder: Builder
    family: str
    kind: ModelKind
    description: str

    @property
    def has_se(self) -> bool:
        """Whether it carries SE blocks (input-dependent gates); False for plain and static."""
        return self.kind == "se"

    @property
    def twin(self) -> str:
        """The plain↔SE counterpart (``resnet20`` ↔ ``se_resnet20``); a static control's twin is
        the SE model whose gates it replaces."""
        return self.family if self.has_se else f"se_{self.family}"

    def options(self) -> dict[str, Any]:
        """Keyword options of the builder with their defaults."""
        sig = inspect.signature(self.builder)
        return {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


_REGISTRY: Registry[ModelInfo] = Registry("architecture", ModelError, hint="or torchvision:<name>, timm:<name>")


def _kind_of(name: str, family: str) -> ModelKind:
    for kind, prefix in KIND_PREFIX.items():
        if name == f"{prefix}{family}":
            return kind
    raise ValueError(
        f"a member of family {family!r} must be named {family!r}, 'se_{family}' or 'static_{family}', not {name!r}"
    )


def register_model(name: str, *, family: str, description: str) -> Callable[[Builder], Builder]:
    """Register a builder. The plain model is ``<family>``, its SE twin ``se_<family>`` and its
    static-gate control ``static_<family>``; the name fixes :attr:`ModelInfo.kind`.

    Raises:
        ValueError: if ``name`` is already registered or does not fit ``family`` (programming errors).
    """

    def deco(fn: Builder) -> Builder:
        _REGISTRY.add(name, ModelInfo(name, fn, family, _kind_of(name, family), description))
        return fn

    return deco


def _plain_builder(build: Callable[..., nn.Module]) -> Builder:
    def plain(
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> nn.Module:
        return build(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, se=None)

    return plain


def _se_builder(build: Callable[..., nn.Module], default_reduction: int) -> Builder:
    def with_se(
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        reduction: int = default_reduction,
        squeeze: Squeeze = "avg",
        gate: Gate = "sigmoid",
    ) -> nn.Module:
        se = {"reduction": reduction, "squeeze": squeeze, "gate": gate}
        return build(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, se=se)

    return with_se


def _static_builder(build: Callable[..., nn.Module]) -> Builder:
    def static(
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        gate: Gate = "sigmoid",
    ) -> nn.Module:
        se = {"kind": "static", "gate": gate}
        return build(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, se=se)

    return static


def register_twins(
    family: str,
    build: Callable[..., nn.Module],
    *,
    description: str,
    se_description: str,
    static_description: str | None = None,
    reduction: int = 16,
) -> None:
    """Register ``family``, ``se_<family>`` and ``static_<family>`` from one builder, so they
    differ only in what sits at the SE sites.

    ``build(num_classes=, in_channels=, mean=, std=, se=)`` gets ``se=None`` for the plain twin,
    the SE options dict for the SE twin and ``{"kind": "static", "gate": ...}`` for the static
    control (see :func:`~robustse.models.layers.make_site`).
    """
    static_description = static_description or f"{family} with a learned static channel scale at each SE site"
    register_model(family, family=family, description=description)(_plain_builder(build))
    register_model(f"se_{family}", family=family, description=se_description)(_se_builder(build, reduction))
    register_model(f"static_{family}", family=family, description=static_description)(_static_builder(build))


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern, e.g. ``"*resnet*"``."""
    return _REGISTRY.names(pattern)


def family_members(family: str) -> dict[ModelKind, str]:
    """``{kind: name}`` of the registered members of ``family``, e.g.
    ``{"plain": "resnet20", "se": "se_resnet20", "static": "static_resnet20"}``.

    Raises:
        ModelError: if no model of that family is registered.
    """
    infos = [model_info(n) for n in list_models()]
    members = {i.kind: i.name for i in infos if i.family == family}
    if not members:
        families = sorted({i.family for i in infos})
        raise ModelError(f"unknown model family {family!r} (valid: {', '.join(families)})")
    return {k: members[k] for k in KIND_PREFIX if k in members}


def model_info(name: str) -> ModelInfo:
    """Registry entry of ``name``.

    Raises:
        ModelError: unknown name, listing the valid ones.
    """
    return _REGISTRY.get(name)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by registry name (or ``torchvision:<name>``, ``timm:<name>``).

    Args:
        name: e.g. ``se_resnet20``.
        **kwargs: builder options: ``num_classes``, ``in_channels``, ``mean``, ``std`` and, for SE
            models, ``reduction``, ``squeeze``, ``gate``; for static controls, ``gate``.

    Returns:
        The model (train mode, freshly initialized).

    Raises:
        ModelError: unknown name or option.

    Example:
        >>> model = create_model("se_resnet20", num_classes=10, in_channels=1)
    """
    _check_sizes(name, kwargs)
    if name.startswith(("torchvision:", "timm:")):
        from robustse.models.external import create_external_model

        model: nn.Module = create_external_model(name, **kwargs)
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


MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
MAX_IN_CHANNELS = 1024


def _check_sizes(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse class and channel counts that are not integers in their documented range (a
    negative count, or a billion channels that would try to allocate hundreds of gigabytes)."""
    for key, most in (("num_classes", MAX_CLASSES), ("in_channels", MAX_IN_CHANNELS)):
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
            raise ModelError(f"{name}: {key} must be an integer in [1, {most:,}] (got {value!r})")


def model_arch(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """(registry name, builder kwargs) recorded by :func:`create_model`.

    Raises:
        ModelError: if the model was not built by :func:`create_model`.
    """
    arch = getattr(model, "robustse_arch", None)
    if arch is None:
        raise ModelError("model was not built by create_model: pass meta={'arch': ..., 'arch_kwargs': ...}")
    return str(arch), dict(getattr(model, "robustse_kwargs", {}))
