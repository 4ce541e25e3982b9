"""Attack engine: FGSM/FGM, PGD (Linf, L2), a random-noise control, and any torchattacks attack.

All attacks work in pixel units on inputs in [0, 1] (normalization is inside the model) and take
many epsilons in one call::

    atk = create_attack("pgd", norm="linf", steps=10)
    res = atk(model, x, y, epsilons=[0.0, 0.01, 0.03])
    res.adversarials[i]          # like x, for epsilons[i]

* One PGD loop with small norm-specific pieces (random start, step, projection) serves every
  gradient attack; FGSM is PGD with one step of size eps and no random start (Goodfellow et al.
  2015; Madry et al. 2018). Without a random start the first gradient does not depend on eps, so it
  is computed once and shared by every epsilon — FGSM's whole ladder costs one backward pass.
* Several epsilons run as one stacked batch (E·B examples, each with its own eps).
* Restarts keep the per-example worst case (misclassified first, then highest loss).
* ``eps = 0`` returns the clean input exactly. The model is put in eval mode and restored.
* ``accuracy_only=True``: larger epsilons attack only the examples that survived smaller ones
  (an adversarial for a smaller eps lies inside every larger ball, so robust accuracy is exact).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robustse.core.device import evaluating
from robustse.core.errors import AttackError
from robustse.core.passes import (
    current_pass_rows,
    rows_of_pass,
)
from robustse.core.registry import Registry
from robustse.core.roles import ROLES, Role, attack_role
from robustse.core.types import MAX_RUNGS

# Documented limits (README "Reliability"): beyond them a command is refused, not left to run for days.
MAX_STEPS = 10_000  # iterations of an iterative attack (also torchattacks' steps / n_queries: 100,000)
MAX_RESTARTS = 100
MAX_QUERIES = 100_000
MAX_PIXEL_UNITS = 1e6  # an eps or step size beyond this is no budget at all (and overflows float32)

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")
DIV_EPS = 1e-10  # guards divisions by a zero gradient or perturbation norm (as torchattacks)


@dataclass
class AttackResult:
    """Adversarial batches for each epsilon.

    Attributes:
        epsilons: the epsilons, in the order asked.
        adversarials: one tensor like ``x`` per epsilon.
        correct: with ``accuracy_only``, one bool tensor (B,) per epsilon: still classified correctly.
    """

    epsilons: tuple[float, ...]
    adversarials: list[torch.Tensor]
    correct: list[torch.Tensor] | None = None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with parameter gradients off; restore both afterwards (each
    submodule's own mode: :func:`robustse.core.device.evaluating`)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with evaluating(model):
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


def hookless_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode, parameter gradients off, without the user's hooks (which
    must not fire for passes the user did not ask for)."""
    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    for m in twin.modules():
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    return twin


class Evaluator:
    """Prediction-only forward passes through a channels_last copy of ``model`` in eval mode.

    Measured on the project's 2-core CPU: evaluation 1.2-1.6x faster than the default layout for
    ``se_small_cnn`` and ``se_resnet20``, logits equal to ~3e-6. Attacks keep differentiating the
    user's model in its own layout, so adversarials stay identical to torchattacks'; only
    predictions go through the copy, and clean and adversarial predictions must both come from it.
    """

    def __init__(self, model: nn.Module, *, copy_model: bool = True) -> None:
        self.copied = copy_model
        if not copy_model:  # the model itself, as it is (hooks and all): e.g. a gate intervention
            self.model = model.eval()
            return
        self.model = hookless_copy(model).to(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` (B, C, H, W)."""
        return self.model(self._layout(x))

    def logits_and_grad(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of ``x`` and the input gradient of the summed cross-entropy, from one pass.

        For diagnostics (a sweep's zero-gradient check), not for attacks: the gradient is the
        channels_last copy's, equal to the model's up to rounding. Measured on the project's
        2-core CPU: 1.6x faster than a forward and backward pass of the model plus a prediction.
        """
        return _by_pass_rows(self._logits_and_grad, x, y)  # under pass_rows, a chunk at a time

    def _logits_and_grad(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._layout(x).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
        return logits.detach(), grad

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and self.copied else x


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """Refuse what an attack cannot use, with one line: non-tensors, an empty batch, inputs that
    are not finite or outside [0, 1], labels that are not integers or not one per input.

    Raises:
        AttackError: naming the problem.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise AttackError(f"x and y must be tensors (got {type(x).__name__}, {type(y).__name__})")
    if x.dim() < 2 or x.shape[0] == 0:
        raise AttackError(f"x must be a non-empty batch (B, ...) (got shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise AttackError(f"x must be floats in [0, 1] (got {x.dtype}; divide uint8 images by 255)")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise AttackError(f"labels must be integers (got {y.dtype})")
    if y.shape != (x.shape[0],):
        raise AttackError(f"{x.shape[0]} inputs but labels of shape {tuple(y.shape)}: one label per input")
    if not bool(torch.isfinite(x).all()):
        raise AttackError("inputs hold NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise AttackError(f"inputs must lie in [0, 1] (got [{float(x.min()):.3g}, {float(x.max()):.3g}])")
    if y.min() < 0:
        raise AttackError(f"labels must be >= 0 (got {int(y.min())})")


def check_fits(model: nn.Module, x: torch.Tensor, *, members: int = 1) -> None:
    """Refuse inputs the model cannot take, with one line instead of torch's error from deep inside
    a pass: a dtype other than the model's weights' (no silent conversion: a bfloat16 model gets
    bfloat16 inputs, a float32 model float32), or a channel count other than its first convolution's
    (``members`` stacked seed models take ``members`` times the channels: README "Seed batching").

    Raises:
        AttackError: naming both sides of the mismatch.
    """
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None and weight.dtype != x.dtype:
        raise AttackError(
            f"inputs are {x.dtype} but the model's weights are {weight.dtype}: pass x.to({weight.dtype}) "
            "(or convert the model)"
        )
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and x.dim() == 4 and x.shape[1] * members != conv.in_channels:
        raise AttackError(
            f"inputs have {x.shape[1]} channel(s) but the model takes {conv.in_channels // max(members, 1)}"
        )


def check_epsilons(epsilons: Sequence[float], norm: str) -> tuple[float, ...]:
    """Validate an epsilon ladder (pixel units).

    Raises:
        AttackError: empty ladder, a negative or non-finite eps, or a Linf eps above 1.
    """
    if isinstance(epsilons, (str, bytes)) or not isinstance(epsilons, (Sequence, torch.Tensor)):
        raise AttackError(f"epsilons must be a list of numbers, e.g. [0.03] (got {epsilons!r})")
    try:
        eps = tuple(float(e) for e in epsilons)
    except (TypeError, ValueError):
        raise AttackError(f"epsilons must be a list of numbers (got {list(epsilons)!r})") from None
    if not eps:
        raise AttackError("no epsilons given")
    if len(eps) > MAX_RUNGS:
        raise AttackError(f"a ladder of {len(eps):,} epsilons is over the limit of {MAX_RUNGS:,}")
    for e in eps:
        if not 0 <= e <= MAX_PIXEL_UNITS:
            raise AttackError(f"eps must be a number in [0, {MAX_PIXEL_UNITS:g}] (got {e})")
        if norm == "linf" and e > 1:
            raise AttackError(f"Linf eps {e} > 1 is larger than the whole pixel range [0, 1]")
    return eps


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


# --------------------------------------------------------------------------- norms


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped (N, 1, 1, 1) for broadcasting."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


class _Linf:
    """Linf ball: uniform start, signed-gradient step, coordinate-wise clipping."""

    @staticmethod
    def random_start(x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        u = torch.rand(x.shape, generator=gen, device=gen.device).to(x.device)
        return (x + (2 * u - 1) * eps).clamp(0, 1)

    @staticmethod
    def step(adv: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return adv + alpha * grad.sign()

    @staticmethod
    def project(x: torch.Tensor, adv: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        delta = torch.maximum(torch.minimum(adv - x, eps), -eps)
        return (x + delta).clamp(0, 1)

    @staticmethod
    def noise(x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        signs = torch.randint(0, 2, x.shape, generator=gen, device=gen.device).to(x.device) * 2 - 1
        return (x + eps * signs).clamp(0, 1)


class _L2:
    """L2 ball: random direction and radius start, normalized-gradient step, radial projection."""

    @staticmethod
    def random_start(x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Radius uniform in [0, eps] along a random direction (as torchattacks; not uniform in volume).
        d = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
        r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=gen, device=gen.device).to(x.device)
        return (x + d / (_flat_norm(d) + DIV_EPS) * r * eps).clamp(0, 1)

    @staticmethod
    def step(adv: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return adv + alpha * (grad / (_flat_norm(grad) + DIV_EPS))  # this order of rounding, as torchattacks

    @staticmethod
    def project(x: torch.Tensor, adv: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        delta = adv - x
        factor = torch.minimum(eps / _flat_norm(delta), torch.ones_like(eps))
        factor = torch.nan_to_num(factor, nan=1.0)  # delta = 0 and eps = 0
        return (x + delta * factor).clamp(0, 1)

    @staticmethod
    def noise(x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        d = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
        return (x + d / (_flat_norm(d) + DIV_EPS) * eps).clamp(0, 1)


_NORM_OPS = {"linf": _Linf, "l2": _L2}


# --------------------------------------------------------------------------- attacks


@dataclass
class Attack:
    """Base class: validation, eval mode, eps = 0, stacking and accuracy-only bookkeeping.

    Subclasses implement :meth:`_perturb` for a batch whose rows carry their own eps.
    """

    norm: str = "linf"
    seed: int = 0
    # Rows per stacked chunk (E·B). Measured on a 2-core CPU, per-image cost rises past ~500 rows
    # (caches), so stacking only pays for small batches there; a GPU wants far more.
    max_batch: int = 256
    # In a sweep, run this attack only at these eps of the ladder (and 0), e.g. an expensive
    # AutoAttack cell at one eps. Not part of the attack's identity in the results store.
    only_eps: tuple[float, ...] | None = None
    name: str = field(default="attack", init=False)
    # K models attacked at once (a stacked network, robustse.models.stacked): x holds K copies of the
    # batch, model by model, and random draws are made once and shared, as K separate calls would.
    _members: int = field(default=1, init=False, repr=False)
    _member_rows: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.norm, str):
            self.norm = self.norm.lower()  # type: ignore[assignment]  # L2 and l2 are one norm
        if self.norm not in NORMS:
            raise AttackError(f"unknown norm {self.norm!r} (valid: {', '.join(NORMS)})")
        if self.only_eps is not None:
            if not isinstance(self.only_eps, (list, tuple)) or not all(_is_real(e) for e in self.only_eps):
                raise AttackError(f"only_eps must be a list of numbers (got {self.only_eps!r})")
            self.only_eps = tuple(float(e) for e in self.only_eps)
        if not _is_int(self.seed) or not 0 <= self.seed < 2**31:
            raise AttackError(f"seed must be an integer in [0, 2^31) (got {self.seed!r})")

    def describe(self) -> dict[str, Any]:
        """Name and options, for stores and reports."""
        skip = ("name", "max_batch", "only_eps")
        opts = {k: v for k, v in vars(self).items() if k not in skip and not k.startswith("_")}
        return {"attack": self.name, **opts}

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        epsilons: Sequence[float],
        accuracy_only: bool = False,
        grad0: torch.Tensor | None = None,
        stream: int = 0,
        members: int = 1,
    ) -> AttackResult:
        """Attack ``x`` (floats in [0, 1], (B, C, H, W)) with labels ``y`` at every eps.

        Args:
            model: classifier returning logits; evaluated in eval mode.
            x: clean inputs.
            y: labels (B,).
            epsilons: perturbation budgets in pixel units (norm of the attack).
            accuracy_only: attack at a larger eps only what survived the smaller ones; fills
                ``result.correct``.
            grad0: the input gradient at ``x`` from :meth:`clean_gradient`, to reuse across calls.
            stream: mixed into the seed, so separate calls (batches, cells) draw independent starts.
            members: ``x`` is K = ``members`` copies of one batch, one per member of a stacked
                model (:func:`robustse.models.stacked.member_rows`); each member gets the random start
                it would get alone (default 1: an ordinary model).

        Returns:
            :class:`AttackResult`.

        Raises:
            AttackError: bad epsilons, inputs that are not finite or outside [0, 1], labels that
                are not integers in range, one per input; inputs of another dtype than the model's
                weights or another channel count than it takes.

        Works inside ``torch.no_grad()`` and ``torch.inference_mode()`` (the usual evaluation
        pattern): gradients are enabled for the attack's own passes.
        """
        eps = check_epsilons(epsilons, self.norm)
        check_batch(x, y)
        check_fits(model, x, members=members)
        if x.is_inference() or y.is_inference():  # made under inference_mode: autograd cannot use them
            with torch.inference_mode(False):
                x, y = x.clone(), y.clone()  # ordinary tensors autograd may use
        with torch.inference_mode(False), torch.enable_grad():
            try:
                return self._attack(model, x, y, eps, accuracy_only=accuracy_only, grad0=grad0, stream=stream,
                                    members=members)  # fmt: skip
            except IndexError as exc:  # cross_entropy: "Target 12 is out of bounds."
                raise AttackError(f"a label is out of range for the model's outputs ({exc})") from None

    def _attack(self, model, x, y, eps, *, accuracy_only, grad0, stream, members) -> AttackResult:  # type: ignore[no-untyped-def]
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + stream)
        if members > 1 and (accuracy_only or not self._tiles_draws()):
            raise AttackError(f"{self.name} cannot attack a stacked model (members > 1)")
        if members < 1 or x.shape[0] % members:
            raise AttackError(f"{x.shape[0]} rows cannot hold {members} members' batches")
        if members > 1 and sum(e > 0 for e in eps) > 1:  # draws must follow a lone member's order
            raise AttackError("a stacked model is attacked one eps at a time")
        self._members, self._member_rows = members, x.shape[0] // members
        with eval_mode(model):
            if accuracy_only:
                return self._accuracy_only(model, x, y, eps, gen, grad0)
            advs: list[torch.Tensor | None] = [x.detach().clone() if e == 0 else None for e in eps]
            todo = [i for i, e in enumerate(eps) if e > 0]
            ladder = self._ladder(model, x, y, [eps[i] for i in todo], gen, grad0=grad0)
            for i, adv in zip(todo, ladder, strict=True):
                advs[i] = adv
            return AttackResult(eps, [a.detach() for a in advs if a is not None])  # never the caller's graph

    def clean_gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, members: int = 1
    ) -> torch.Tensor | None:
        """The input gradient at ``x`` if this attack's first step uses it for every eps, else None.

        Pass it back as ``grad0`` to reuse it across calls (a sweep's FGSM cells share one).
        ``members``: as for :meth:`__call__` (the loss is divided by one member's batch).
        """
        if not self._shares_first_gradient():
            return None
        with eval_mode(model), torch.enable_grad():
            grad, _ = _input_grad(model, x, y, x.shape[0] // members)
        return grad

    def _ladder(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: list[float],
        gen: torch.Generator,
        *,
        early_stop: bool = False,
        grad0: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Adversarials for every eps > 0, stacking epsilons into chunks of at most max_batch rows.

        ``early_stop``: an iterative attack may stop on an example as soon as it is misclassified.
        ``grad0``: the input gradient at the clean batch, if the caller already has it.
        """
        if not eps:
            return []
        b = x.shape[0]
        if grad0 is None and self._shares_first_gradient():
            # Without a random start the first step's gradient is taken at the clean input for
            # every eps: compute it once for the whole ladder (FGSM's ladder is one backward pass).
            grad0, _ = _input_grad(model, x, y, b)
        per_chunk = max(1, self.max_batch // max(1, b))
        out: list[torch.Tensor] = []
        for start in range(0, len(eps), per_chunk):
            chunk = eps[start : start + per_chunk]
            e = torch.tensor(chunk, dtype=x.dtype, device=x.device).repeat_interleave(b)
            e = e.view(-1, *([1] * (x.dim() - 1)))  # (E·B, 1, 1, 1)
            reps = (len(chunk),) + (1,) * (x.dim() - 1)
            g = grad0.repeat(reps) if grad0 is not None else None
            adv = self._perturb(
                model,
                x.repeat(reps),
                y.repeat(len(chunk)),
                e,
                gen,
                batch=b // self._members,
                grad0=g,
                early_stop=early_stop,
            )
            out.extend(adv.split(b))
        return out

    def _shares_first_gradient(self) -> bool:
        """Whether the first step's gradient is the same for every eps (no random start)."""
        return False

    def _tiles_draws(self) -> bool:
        """Whether this attack can run on K members at once (its random draws are tiled)."""
        return False

    def _draw(self, fn, x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """``fn(x, eps, gen)`` (a random start or noise) drawn once for all members: rows are
        (E, K, B) = eps × member × example, and every member gets member 0's draws, which are
        the draws a call on that member alone makes (its rows are the same clean batch)."""
        k = self._members
        if k == 1:
            return fn(x, eps, gen)
        b, rest = self._member_rows, x.shape[1:]
        blocks = x.shape[0] // (k * b)
        x0 = x.view(blocks, k, b, *rest)[:, 0].reshape(-1, *rest)
        e0 = eps.view(blocks, k, b, *eps.shape[1:])[:, 0].reshape(-1, *eps.shape[1:])
        first = fn(x0, e0, gen)
        return first.view(blocks, 1, b, *rest).expand(blocks, k, b, *rest).reshape(x.shape)

    def _accuracy_only(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: tuple[float, ...],
        gen: torch.Generator,
        grad0: torch.Tensor | None = None,
    ) -> AttackResult:
        order = sorted(range(len(eps)), key=lambda i: eps[i])
        advs: dict[int, torch.Tensor] = {}
        correct: dict[int, torch.Tensor] = {}
        current = x.clone()
        if grad0 is None and self._shares_first_gradient():  # one pass gives the clean predictions too
            grad0, logits = _input_grad(model, x, y, x.shape[0])
        else:
            with torch.no_grad():
                logits = model(x)
        alive = logits.argmax(1) == y
        for i in order:
            if eps[i] > 0 and bool(alive.any()):
                idx = alive.nonzero().flatten()
                g = grad0[idx] if grad0 is not None else None
                (adv,) = self._ladder(model, x[idx], y[idx], [eps[i]], gen, early_stop=True, grad0=g)
                current = current.clone()
                current[idx] = adv
                with torch.no_grad():
                    alive[idx] = model(adv).argmax(1) == y[idx]
            advs[i], correct[i] = current, alive.clone()
        return AttackResult(eps, [advs[i] for i in range(len(eps))], [correct[i] for i in range(len(eps))])

    def _perturb(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: torch.Tensor,
        gen: torch.Generator,
        *,
        batch: int,
        grad0: torch.Tensor | None = None,
        early_stop: bool = False,
    ) -> torch.Tensor:
        """Adversarial rows for stacked inputs ``x`` (E·B) whose rows carry budgets ``eps``.

        ``batch`` is B, the unstacked batch size (the loss is divided by it); ``grad0`` the
        gradient at the clean input, tiled like ``x``, when the first step can use it;
        ``early_stop``: rows already misclassified may keep their current (valid) adversarial.
        """
        raise NotImplementedError


@dataclass
class PGD(Attack):
    """Projected gradient descent on the cross-entropy loss (Madry et al., ICLR 2018).

    Args:
        norm: ``linf`` or ``l2``.
        steps: gradient steps (>= 1).
        rel_stepsize: step size as a multiple of eps (default 2.5 / steps).
        abs_stepsize: absolute step size in pixels (overrides ``rel_stepsize``).
        random_start: start uniformly inside the ball.
        restarts: independent runs; each example keeps its worst case.
        seed: seeds random starts.
    """

    steps: int = 10
    rel_stepsize: float | None = None
    abs_stepsize: float | None = None
    random_start: bool = True
    restarts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = "pgd"
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise AttackError(f"steps must be an integer in [1, {MAX_STEPS:,}] (got {self.steps!r})")
        if not _is_int(self.restarts) or not 1 <= self.restarts <= MAX_RESTARTS:
            raise AttackError(f"restarts must be an integer in [1, {MAX_RESTARTS}] (got {self.restarts!r})")
        if not isinstance(self.random_start, bool):
            raise AttackError(f"random_start must be true or false (got {self.random_start!r})")
        for key in ("rel_stepsize", "abs_stepsize"):
            value = getattr(self, key)
            if value is not None and (not _is_real(value) or not 0 < value <= MAX_PIXEL_UNITS):
                raise AttackError(f"{key} must be a number in (0, {MAX_PIXEL_UNITS:g}] (got {value!r})")
        if self.restarts > 1 and not self.random_start:
            raise AttackError("restarts > 1 need random_start = true (otherwise every restart is the same)")
        if self.rel_stepsize is None:
            self.rel_stepsize = 2.5 / self.steps

    def _alpha(self, eps: torch.Tensor) -> torch.Tensor:
        if self.abs_stepsize is not None:
            return torch.full_like(eps, self.abs_stepsize)
        assert self.rel_stepsize is not None
        return eps * self.rel_stepsize

    def _shares_first_gradient(self) -> bool:
        return not self.random_start

    def _tiles_draws(self) -> bool:
        return True

    def _perturb(self, model, x, y, eps, gen, *, batch, grad0=None, early_stop=False):  # type: ignore[no-untyped-def]
        ops = _NORM_OPS[self.norm]
        alpha = self._alpha(eps)
        b = batch
        best, best_score = x, None
        for _ in range(self.restarts):
            if self.random_start:
                adv = self._draw(ops.random_start, x, eps, gen)
                first = 0
            else:
                if grad0 is None:
                    grad0, _ = self._grad(model, x, y, b)
                adv = ops.project(x, ops.step(x, grad0, alpha), eps)
                first = 1
            if early_stop:
                adv = self._iterate_until_fooled(model, x, y, eps, alpha=alpha, start=(adv, first), batch=b)
            else:
                for _step in range(first, self.steps):
                    grad, _ = self._grad(model, adv, y, b)
                    adv = ops.project(x, ops.step(adv, grad, alpha), eps)
            if self.restarts == 1:
                return adv
            with torch.no_grad():
                logits = model(adv)
                score = F.cross_entropy(logits, y, reduction="none") + 1e6 * (logits.argmax(1) != y)
            if best_score is None:
                best, best_score = adv, score
            else:
                better = score > best_score
                best = torch.where(better.view(-1, 1, 1, 1), adv, best)
                best_score = torch.maximum(score, best_score)
        return best

    def _grad(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient the attack ascends, and the logits (PGD: the cross-entropy's)."""
        return _input_grad(model, x, y, batch)

    def _iterate_until_fooled(self, model, x, y, eps, *, alpha, start, batch):  # type: ignore[no-untyped-def]
        """The PGD iterations from ``start`` = (iterate, its step number), dropping each row from
        the batch once an iterate fools the model (``batch``: the loss's batch size).

        Every iterate lies in the eps-ball, so a fooling iterate is a valid adversarial; robust
        accuracy can only be lower (stronger) than with the last iterate alone, and later steps
        cost nothing for the rows already fooled.
        """
        ops = _NORM_OPS[self.norm]
        adv, first = start[0].clone(), start[1]
        active = torch.arange(x.shape[0], device=x.device)
        for _step in range(first, self.steps):
            grad, logits = _input_grad(model, adv[active], y[active], batch)
            still = logits.argmax(1) == y[active]  # the iterate before this step did not fool yet
            if not bool(still.all()):
                active, grad = active[still], grad[still]
                if active.numel() == 0:
                    break
            a = active
            adv[a] = ops.project(x[a], ops.step(adv[a], grad, alpha[a]), eps[a])
        return adv


def grad_bytes_per_row(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes the autograd graph of an input-gradient pass of ``model`` holds per row of ``x``:
    the activations it saves for the backward pass (weights and buffers, held anyway, not
    counted), measured on the rows of ``x`` by a saved-tensor hook, through a copy of ``model``
    (the user's hooks do not see the pass)."""
    model = hookless_copy(model)
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    row = x[:1]
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # a random layer's draws leave the sweep's streams alone
        # each pass on rows of its own storage: a view of a shared one would count the same bytes twice
        one, two = (_saved_bytes(model, row.expand(n, *x.shape[1:]).clone(), held) for n in (1, 2))
    return max(0, two - one)  # the growth per row: what does not grow with the batch is not per row


def _saved_bytes(model: nn.Module, x: torch.Tensor, held: set[int]) -> int:
    """Bytes of the tensors one input-gradient pass of ``model`` on ``x`` saves for backward,
    each storage once, those in ``held`` not counted."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x.detach().requires_grad_(True))
        F.cross_entropy(logits, logits.detach().argmax(1))
    return sum(saved.values())


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradient of the cross-entropy summed over rows and divided by ``batch``, and the logits.

    Dividing by the unstacked batch size B (not the E·B stacked rows) gives every row exactly the
    gradient of a mean-loss attack on B examples, as torchattacks computes it; this matters for L2
    steps, whose normalization adds a small constant to the gradient norm. Under
    :func:`pass_rows` the rows go through in chunks.
    """
    return _by_pass_rows(lambda xc, yc: _chunk_grad(model, xc, yc, batch), x, y)


def _by_pass_rows(
    fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(x, y)`` (a pair of per-row tensors), taken :func:`pass_rows` rows at a time and joined."""
    rows = current_pass_rows() or len(x)
    if rows >= len(x):
        return fn(x, y)
    parts = []
    for i in range(0, len(x), rows):
        with rows_of_pass(slice(i, i + rows), len(x)):
            parts.append(fn(x[i : i + rows], y[i : i + rows]))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _chunk_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, y, reduction="sum") / batch
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


@dataclass
class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al., ICLR 2015); FGM for ``norm="l2"``.

    PGD with one step of size eps and no random start: one gradient serves every epsilon.
    """

    steps: int = field(default=1, init=False)
    rel_stepsize: float | None = field(default=1.0, init=False)
    abs_stepsize: float | None = field(default=None, init=False)
    random_start: bool = field(default=False, init=False)
    restarts: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = "fgsm"


@dataclass
class GateAttack(PGD):
    """PGD that maximizes the excitation drift instead of the loss: how far can δ move the gates?

    Ascends the total gate drift Σ_gates ‖s(x+δ) − s(x)‖₂ / ‖s(x)‖₂ (per example) inside the
    eps-ball, from a random start (at δ = 0 the drift has no gradient). Labels are not used. It
    needs a model with gates; a sweep skips it for plain models, and it never counts toward robust
    accuracy. Options as :class:`PGD` (one run: restarts would need a drift score).
    """

    random_start: bool = field(default=True, init=False)
    restarts: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = "gate"
        self._clean: dict[str, torch.Tensor] = {}

    def _tiles_draws(self) -> bool:
        return False  # its drift norm would mix the members' gates

    def _perturb(self, model, x, y, eps, gen, *, batch, grad0=None, early_stop=False):  # type: ignore[no-untyped-def]
        from robustse.models.gates import find_gates
        from robustse.probes.capture import capture

        if not find_gates(model):
            raise AttackError("the gate attack needs a model with SE gates (this one has none)")
        with torch.no_grad(), capture(model) as rec:
            model(x)
        self._clean = dict(rec.gates)
        try:  # every row runs every step: misclassification is not this attack's goal
            return super()._perturb(model, x, y, eps, gen, batch=batch)
        finally:
            self._clean = {}

    def _grad(self, model, x, y, batch):  # type: ignore[no-untyped-def]
        from robustse.probes.capture import capture

        x = x.detach().requires_grad_(True)
        with capture(model, detach=False) as rec:
            logits = model(x)
        drift = sum(
            ((s - self._clean[n]).pow(2).sum(1) + 1e-12).sqrt() / self._clean[n].norm(dim=1).clamp_min(1e-12)
            for n, s in rec.gates.items()
        )
        (grad,) = torch.autograd.grad(drift.sum() / batch, x)  # type: ignore[union-attr]
        return grad, logits.detach()


@dataclass
class Noise(Attack):
    """Random-noise control at the same norm and eps: ±eps per pixel (Linf) or a random
    direction of L2 length eps, then clipped to [0, 1]."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = "noise"

    def _tiles_draws(self) -> bool:
        return True

    def _perturb(self, model, x, y, eps, gen, *, batch, grad0=None, early_stop=False):  # type: ignore[no-untyped-def]
        return self._draw(_NORM_OPS[self.norm].noise, x, eps, gen)


@dataclass
class TorchattacksAttack(Attack):
    """Any torchattacks attack by name, eps injected per epsilon, other options passed through."""

    attack: str = "PGD"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = f"torchattacks:{self.attack}"
        try:
            import torchattacks
        except ImportError:  # pragma: no cover - a dependency
            raise AttackError("torchattacks is not installed (pip install torchattacks)") from None
        cls = getattr(torchattacks, self.attack, None)
        if not (isinstance(cls, type) and issubclass(cls, torchattacks.attack.Attack)):
            valid = sorted(n for n in dir(torchattacks) if n[:1].isupper() and n not in ("Attack", "MultiAttack"))
            raise AttackError(f"unknown torchattacks attack {self.attack!r} (valid: {', '.join(valid)})")
        params = inspect.signature(cls).parameters
        if "eps" not in params:
            raise AttackError(f"torchattacks:{self.attack} has no eps budget, so it cannot run over an eps ladder")
        allowed = [p for p in params if p not in ("self", "model", "eps")]
        bad = sorted(set(self.options) - set(allowed))
        if bad:
            raise AttackError(
                f"torchattacks:{self.attack}: option {bad[0]!r} not allowed (valid: {', '.join(allowed)}; "
                "eps comes from the ladder)"
            )
        for key, value in self.options.items():
            _check_option_type(self.name, key, value, params[key].default)
            most = {"steps": MAX_STEPS, "n_restarts": MAX_RESTARTS, "n_queries": MAX_QUERIES}.get(key)
            if most is not None and not 1 <= value <= most:
                raise AttackError(f"{self.name}: option {key} must be in [1, {most:,}] (got {value!r})")
        # norm and seed are robustse's (the budget's norm, the random starts); an attack that has
        # its own takes them too, so no option is silently dropped
        self._shared = {k: v for k, v in (("norm", {"linf": "Linf", "l2": "L2"}[self.norm]), ("seed", self.seed))
                        if k in params}  # fmt: skip
        self._cls = cls
        try:  # constructor-level type errors surface now, as one line, not mid-sweep
            cls(nn.Linear(1, 1), eps=0.1, **self.options, **self._shared)
        except _OPTION_ERRORS as exc:
            raise AttackError(
                f"torchattacks:{self.attack}: bad option value ({str(exc).strip() or type(exc).__name__})"
            ) from None

    def describe(self) -> dict[str, Any]:
        return {"attack": self.name, "norm": self.norm, "seed": self.seed, **self.options}

    def _ladder(self, model, x, y, eps, gen, *, early_stop=False, grad0=None):  # type: ignore[no-untyped-def]
        out = []
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(self.seed)
            for e in eps:
                try:
                    out.append(self._cls(model, eps=e, **self.options, **self._shared)(x, y).detach())
                except _OPTION_ERRORS as exc:
                    # option values torchattacks checks only when run (kernel_name=foo, loss=foo)
                    reason = str(exc).strip() or type(exc).__name__
                    raise AttackError(f"torchattacks:{self.attack}: bad option value ({reason})") from None
                except RuntimeError as exc:  # e.g. TIFGSM's kernels assume 3-channel images
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "RuntimeError"
                    raise AttackError(f"torchattacks:{self.attack} cannot attack these inputs ({reason})") from None
        return out


# What torchattacks raises for option values it checks itself (kernel_name=foo, loss=foo)
_OPTION_ERRORS = (TypeError, ValueError, KeyError, NotImplementedError, AssertionError)


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
        ok = _is_int(value)
    elif isinstance(default, float):
        ok = _is_real(value) and math.isfinite(float(value))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a finite number"}.get(
            type(default), type(default).__name__
        )
        raise AttackError(f"{attack}: option {key} must be {want} (default {default!r}), got {value!r}")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class AttackInfo:
    """A registered attack class and a line about it."""

    name: str
    cls: type[Attack]
    description: str

    @property
    def role(self) -> Role:
        """What the attack is for (:mod:`robustse.core.roles`): attack, control or probe."""
        return attack_role(self.name)

    def options(self) -> dict[str, Any]:
        """Keyword options with defaults (``robustse attacks`` lists them)."""
        return {
            f.name: f.default
            for f in self.cls.__dataclass_fields__.values()  # type: ignore[attr-defined]
            if f.init and f.name not in ("max_batch", "options")
        }


_REGISTRY: Registry[AttackInfo] = Registry("attack", AttackError, hint="or torchattacks:<Name>")
for _info in (
    AttackInfo("fgsm", FGSM, "FGSM (Linf) / FGM (L2): one gradient, reused for every eps"),
    AttackInfo("pgd", PGD, "PGD (Linf, L2): random start, steps, restarts keep the worst case"),
    AttackInfo("noise", Noise, "random-noise control: same norm and eps, no gradient"),
    AttackInfo("gate", GateAttack, "PGD maximizing total gate drift instead of the loss (SE models only)"),
):
    if _info.name not in ROLES:  # every registered attack declares its role (attack, control, probe)
        raise ValueError(f"attack {_info.name!r} has no role in robustse.core.roles.ROLES")
    _REGISTRY.add(_info.name, _info)


def list_attacks(pattern: str = "*") -> list[str]:
    """Registered attack names (torchattacks attacks are reached as ``torchattacks:<Name>``)."""
    return _REGISTRY.names(pattern)


def attack_info(name: str) -> AttackInfo:
    """Registry entry of ``name`` (AttackError listing the valid names if unknown)."""
    return _REGISTRY.get(name)


def create_attack(name: str, **kwargs: Any) -> Attack:
    """Build an attack by name.

    Args:
        name: ``fgsm``, ``pgd``, ``noise`` or ``torchattacks:<Name>``.
        **kwargs: options (``norm``, ``steps``, ``rel_stepsize``, ``random_start``, ``restarts``,
            ``seed``...); for torchattacks, that attack's own keyword arguments.

    Raises:
        AttackError: unknown attack, norm or option, or an out-of-range option.

    Example:
        >>> atk = create_attack("pgd", norm="linf", steps=10)
    """
    if name.startswith("torchattacks:"):
        attack = name.split(":", 1)[1]
        common = {k: kwargs.pop(k) for k in ("norm", "seed", "only_eps") if k in kwargs}
        # torchattacks names its L2 attacks *L2 (PGDL2, FGSM has no L2 twin): the budget's norm;
        # attacks with a norm option of their own (APGD, Square, AutoAttack) get it from here
        common.setdefault("norm", "l2" if attack.upper().endswith("L2") else "linf")
        return TorchattacksAttack(attack=attack, options=kwargs, **common)
    info = attack_info(name)
    valid = info.options()
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise AttackError(f"{name}: unknown option {unknown[0]!r} (valid: {', '.join(valid)})")
    try:
        return info.cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the option check above
        raise AttackError(f"{name}: {exc}") from None
