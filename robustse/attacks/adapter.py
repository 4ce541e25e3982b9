"""Any torchattacks attack (Kim, "Torchattacks", 2020) as a robustse attack: ``torchattacks:<Name>``
with that attack's own keyword options; the eps of each rung is injected by the ladder."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from robustse.attacks.base import Attack, Rungs
from robustse.attacks.checks import MAX_QUERIES, MAX_RESTARTS, MAX_STEPS, is_int, is_real
from robustse.core.errors import AttackError
from robustse.core.roles import TORCHATTACKS_PREFIX

# What torchattacks raises for option values it checks itself (kernel_name=foo, loss=foo)
_OPTION_ERRORS = (TypeError, ValueError, KeyError, NotImplementedError, AssertionError)


@dataclass
class TorchattacksAttack(Attack):
    """Any torchattacks attack by name, eps injected per rung, other options passed through.

    Each rung runs alone with the global torch RNG seeded by ``seed`` (and restored afterwards), so
    a rung's result does not depend on the rest of the ladder.
    """

    attack: str = "PGD"
    options: dict[str, Any] = field(default_factory=dict)
    stacks_rungs: ClassVar[bool] = False  # torchattacks takes one eps per call

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.attack, str):
            raise AttackError(f"the torchattacks attack must be named by a string (got {self.attack!r})")
        cls = _torchattacks_class(self.attack)
        params = inspect.signature(cls).parameters
        if "eps" not in params:
            raise AttackError(f"{self.name} has no eps budget, so it cannot run over an eps ladder")
        _check_options(self.name, self.options, params)
        # norm and seed are robustse's (the budget's norm, the random starts); an attack that has
        # its own takes them too, so no option is silently dropped
        self._shared = {k: v for k, v in (("norm", {"linf": "Linf", "l2": "L2"}[self.norm]), ("seed", self.seed))
                        if k in params}  # fmt: skip
        self._cls = cls
        try:  # constructor-level type errors surface now, as one line, not mid-sweep
            cls(nn.Linear(1, 1), eps=0.1, **self.options, **self._shared)
        except _OPTION_ERRORS as exc:
            raise AttackError(f"{self.name}: bad option value ({str(exc).strip() or type(exc).__name__})") from None

    @property
    def name(self) -> str:
        return f"{TORCHATTACKS_PREFIX}{self.attack}"

    def describe(self) -> dict[str, Any]:
        exact = {"exact": True} if self.exact else {}  # as Attack.describe: only when set
        return {"attack": self.name, "norm": self.norm, "seed": self.seed, **self.options, **exact}

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, rungs: Rungs
    ) -> torch.Tensor:
        e = float(eps.flatten()[0])  # one rung per call (stacks_rungs = False)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(self.seed)
            try:
                return self._cls(model, eps=e, **self.options, **self._shared)(x, y).detach()
            except _OPTION_ERRORS as exc:
                # option values torchattacks checks only when run (kernel_name=foo, loss=foo)
                reason = str(exc).strip() or type(exc).__name__
                raise AttackError(f"{self.name}: bad option value ({reason})") from None
            except RuntimeError as exc:  # e.g. TIFGSM's kernels assume 3-channel images
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "RuntimeError"
                raise AttackError(f"{self.name} cannot attack these inputs ({reason})") from None


def _torchattacks_class(attack: str) -> type:
    """The torchattacks class called ``attack`` (AttackError listing the valid names if none)."""
    try:
        import torchattacks
    except ImportError:  # pragma: no cover - a dependency
        raise AttackError("torchattacks is not installed (pip install torchattacks)") from None
    cls = getattr(torchattacks, attack, None)
    if not (isinstance(cls, type) and issubclass(cls, torchattacks.attack.Attack)):
        valid = sorted(n for n in dir(torchattacks) if n[:1].isupper() and n not in ("Attack", "MultiAttack"))
        raise AttackError(f"unknown torchattacks attack {attack!r} (valid: {', '.join(valid)})")
    return cls


def _check_options(name: str, options: dict[str, Any], params: Any) -> None:
    """Refuse options the torchattacks class does not take, of the wrong type, or out of range."""
    allowed = [p for p in params if p not in ("self", "model", "eps")]
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise AttackError(
            f"{name}: option {bad[0]!r} not allowed (valid: {', '.join(allowed)}; eps comes from the ladder)"
        )
    for key, value in options.items():
        _check_option_type(name, key, value, params[key].default)
        most = {"steps": MAX_STEPS, "n_restarts": MAX_RESTARTS, "n_queries": MAX_QUERIES}.get(key)
        if most is not None and not 1 <= value <= most:
            raise AttackError(f"{name}: option {key} must be in [1, {most:,}] (got {value!r})")


def _check_option_type(attack: str, key: str, value: Any, default: Any) -> None:
    """Refuse a torchattacks option whose type differs from its default's (``steps=1.5``,
    ``verbose="yes"``): torchattacks would fail on it mid-sweep, or silently misbehave.

    Raises:
        AttackError: one line naming the option, the type wanted and the default.
    """
    if default is None or default is inspect.Parameter.empty:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = is_int(value)
    elif isinstance(default, float):
        ok = is_real(value) and math.isfinite(float(value))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a finite number"}.get(
            type(default), type(default).__name__
        )
        raise AttackError(f"{attack}: option {key} must be {want} (default {default!r}), got {value!r}")
