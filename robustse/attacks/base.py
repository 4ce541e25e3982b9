"""The attack contract: what every attack, built in or a user's, promises and what the base class
does for it.

A subclass of :class:`Attack` implements one hook, :meth:`Attack.perturb`, for a batch whose rows
carry their own budgets. The base class owns everything around it, in a final ``__call__``
(Foolbox 3's ``Attack.__call__`` / ``run`` split): checking the epsilon ladder and the batch, the
model's eval mode (restored afterwards), ``eps = 0`` (the clean input, exactly), stacking several
epsilons into one batch, one random stream per rung (so a rung's result does not depend on the
other rungs of the ladder), the accuracy-only bookkeeping, and the budget: every adversarial
leaves in the eps-ball and in [0, 1], whatever the hook returned. See README "Adding an attack".
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, final

import torch
import torch.nn.functional as F
from torch import nn

from robustse.attacks.checks import check_batch, check_epsilons, check_fits, check_members, is_int, is_real
from robustse.attacks.norms import NORMS, Norm
from robustse.core.device import evaluating
from robustse.core.errors import AttackError
from robustse.core.passes import current_pass_rows, rows_of_pass
from robustse.core.roles import Role, attack_role
from robustse.models.eval_copy import copy_for, in_default_layout_if_needed

Draw = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


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


@dataclass
class Rungs:
    """What :meth:`Attack.perturb` knows about the rows it is given beyond the tensors.

    The rows are R rungs of the ladder stacked (rung by rung, each rung the whole batch; with a
    stacked model, member by member inside a rung).

    Attributes:
        generators: one random stream per rung; draw through :meth:`draw`.
        batch: B, the examples of one rung of one member: divide a summed loss by it, so every row
            gets the gradient of a mean-loss attack on B examples (as torchattacks computes it).
        grad0: the input gradient at the clean rows, tiled like them, when the caller has it.
        early_stop: rows already misclassified may keep their current (valid) adversarial.
        members: K models of a stacked network attacked at once (1: an ordinary model).
    """

    generators: list[torch.Generator]
    batch: int
    grad0: torch.Tensor | None = None
    early_stop: bool = False
    members: int = 1

    def draw(self, fn: Draw, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``fn(x, eps, gen)`` (a random start or noise), each rung from its own stream and every
        member of a stacked model with member 0's draws: what a call on that rung and member alone
        draws (its rows are the same clean batch)."""
        k, b, rest = self.members, self.batch, x.shape[1:]
        rungs = x.shape[0] // (k * b)
        if len(self.generators) != rungs:
            raise AttackError(f"{rungs} rungs of rows but {len(self.generators)} random streams")
        xs, es = x.view(rungs, k, b, *rest), eps.view(rungs, k, b, *eps.shape[1:])
        first = [fn(xs[r, 0], es[r, 0], g) for r, g in enumerate(self.generators)]
        if k == 1:  # an ordinary model: the draws are the rows
            return first[0] if rungs == 1 else torch.cat(first)
        return torch.stack(first).unsqueeze(1).expand(rungs, k, b, *rest).reshape(x.shape)


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


@dataclass
class Attack(ABC):
    """An attack over an epsilon ladder. Subclass it, implement :meth:`perturb`, and register it
    with :func:`robustse.attacks.register_attack` to make it a ``--attack`` name.

    Args:
        norm: the budget's norm, ``linf`` or ``l2`` (:attr:`norm_ops` gives its hooks).
        seed: seeds the random streams (with the call's ``stream``).
        max_batch: rows per stacked chunk (rungs × batch). Measured on a 2-core CPU, per-image cost
            rises past ~500 rows (caches), so stacking pays only for small batches there.
        only_eps: in a sweep, run this attack only at these eps of the ladder (and 0), e.g. an
            expensive cell at one eps. Not part of the attack's identity in the results store.
        exact: differentiate ``model`` itself, so results equal torchattacks' bit for bit (part
            of the attack's identity in the results store only when true). By
            default the gradient passes run an eval-mode copy with batch norms folded into their
            convolutions (and channels_last weights on a CPU,
            :func:`robustse.models.eval_copy.eval_copy`): the same function up to float rounding,
            measured 1.8-2.3x faster per pass on a 2-core CPU (README "Performance").

    Class attributes a subclass may set: ``stacks_rungs = False`` to get one rung per
    :meth:`perturb` call (every row with the same eps), e.g. for a library that takes one eps.
    """

    norm: str = "linf"
    seed: int = 0
    max_batch: int = 256
    only_eps: tuple[float, ...] | None = None
    exact: bool = False
    # Set by register_attack: the registry name, stored with every result (:attr:`name`).
    attack_name: ClassVar[str] = "attack"
    stacks_rungs: ClassVar[bool] = True
    _registered: ClassVar[type | None] = None  # the class register_attack registered (not a subclass)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: implement perturb(), not __call__ (the base class owns the ladder)")

    def __post_init__(self) -> None:
        if isinstance(self.norm, str):
            self.norm = self.norm.lower()  # L2 and l2 are one norm
        if self.norm not in NORMS:
            raise AttackError(f"unknown norm {self.norm!r} (valid: {', '.join(NORMS)})")
        if self.only_eps is not None:
            if not isinstance(self.only_eps, (list, tuple)) or not all(is_real(e) for e in self.only_eps):
                raise AttackError(f"only_eps must be a list of numbers (got {self.only_eps!r})")
            self.only_eps = tuple(float(e) for e in self.only_eps)
        if not isinstance(self.exact, bool):
            raise AttackError(f"exact must be true or false (got {self.exact!r})")
        if not is_int(self.seed) or not 0 <= self.seed < 2**31:
            raise AttackError(f"seed must be an integer in [0, 2^31) (got {self.seed!r})")

    # ------------------------------------------------------------------ the hooks

    @abstractmethod
    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, rungs: Rungs
    ) -> torch.Tensor:
        """Adversarial rows for ``x`` (N, C, H, W), whose rows carry budgets ``eps`` (N, 1, 1, 1).

        ``model`` is in eval mode with parameter gradients off, and autograd is on; it is the
        caller's model or, unless ``exact``, its eval-mode copy (same function up to rounding,
        same module names, the model's hooks still fire). Return a tensor
        like ``x``; the caller projects anything outside the eps-ball or [0, 1] back into it.
        """

    def shares_first_gradient(self) -> bool:
        """Whether the first step's gradient is the clean input's for every eps (no random start):
        the ladder then computes it once and passes it as ``rungs.grad0``."""
        return False

    def tiles_draws(self) -> bool:
        """Whether this attack can run on K stacked members at once (its draws go through
        :meth:`Rungs.draw`, and nothing mixes the members' rows)."""
        return False

    @property
    def name(self) -> str:
        """The name this attack is registered (and stored) under."""
        return self.attack_name

    @property
    def norm_ops(self) -> Norm:
        """The hooks of this attack's norm (random start, step, project, noise)."""
        return NORMS[self.norm]

    @property
    def role(self) -> Role:
        """What the attack is for (README "Adding an attack"): attack, control or probe."""
        return attack_role(self.name)

    def describe(self) -> dict[str, Any]:
        """Name and options, for stores and reports."""
        skip = ("name", "max_batch", "only_eps", "exact")
        opts = {k: v for k, v in vars(self).items() if k not in skip and not k.startswith("_")}
        if self.exact:  # a cell of its own; the default path's cells keep their identity
            opts["exact"] = True
        return {"attack": self.name, **opts}

    # ------------------------------------------------------------------ the final call

    @final
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
        check_members(self, x, eps, members=members, accuracy_only=accuracy_only)
        if x.is_inference() or y.is_inference():  # made under inference_mode: autograd cannot use them
            with torch.inference_mode(False):
                x, y = x.clone(), y.clone()  # ordinary tensors autograd may use
        with torch.inference_mode(False), torch.enable_grad():
            try:
                return self._attack(model, x, y, eps, accuracy_only=accuracy_only, grad0=grad0, stream=stream,
                                    members=members)  # fmt: skip
            except IndexError as exc:  # cross_entropy: "Target 12 is out of bounds."
                raise AttackError(f"a label is out of range for the model's outputs ({exc})") from None

    def clean_gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, members: int = 1
    ) -> torch.Tensor | None:
        """The input gradient at ``x`` if this attack's first step uses it for every eps, else None.

        Pass it back as ``grad0`` to reuse it across calls (a sweep's FGSM cells share one).
        ``members``: as for ``__call__`` (the loss is divided by one member's batch).
        """
        if not self.shares_first_gradient():
            return None
        with eval_mode(model), torch.enable_grad():
            grad, _ = in_default_layout_if_needed(
                model, lambda: input_grad(self.gradient_model(model, x), x, y, x.shape[0] // members)
            )
        return grad

    def gradient_model(self, model: nn.Module, x: torch.Tensor) -> nn.Module:
        """The model the gradient passes run, ``model`` in eval mode: itself with ``exact``, else
        its eval-mode copy (channels_last on a CPU; :func:`robustse.models.eval_copy.eval_copy`)."""
        return model if self.exact else copy_for(model, x)

    def _attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: tuple[float, ...], *,
        accuracy_only: bool, grad0: torch.Tensor | None, stream: int, members: int,
    ) -> AttackResult:  # fmt: skip
        def ladder() -> AttackResult:
            run = LadderRun(self, self.gradient_model(model, x), seed=self.seed * 1_000_003 + stream, members=members)
            return run.survivors(x, y, eps, grad0) if accuracy_only else run.every_rung(x, y, eps, grad0)

        with eval_mode(model):
            return in_default_layout_if_needed(model, ladder)


class LadderRun:
    """One call's ladder: rungs stacked into chunks of at most ``attack.max_batch`` rows, each rung
    with its own random stream (seeded by ``seed`` alone, so a rung gets what a call with that eps
    alone gets), and every result brought into its eps-ball."""

    def __init__(self, attack: Attack, model: nn.Module, *, seed: int, members: int) -> None:
        self.attack, self.model, self.seed, self.members = attack, model, seed, members

    def every_rung(
        self, x: torch.Tensor, y: torch.Tensor, eps: tuple[float, ...], grad0: torch.Tensor | None
    ) -> AttackResult:
        """Adversarials at every eps; eps = 0 is the clean input itself."""
        advs: list[torch.Tensor | None] = [x.detach().clone() if e == 0 else None for e in eps]
        todo = [i for i, e in enumerate(eps) if e > 0]
        for i, adv in zip(todo, self.ladder(x, y, [eps[i] for i in todo], grad0=grad0), strict=True):
            advs[i] = adv
        return AttackResult(eps, [a.detach() for a in advs if a is not None])  # never the caller's graph

    def ladder(
        self, x: torch.Tensor, y: torch.Tensor, eps: list[float], *, early_stop: bool = False,
        grad0: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:  # fmt: skip
        """Adversarials for every eps > 0 (``grad0``: the input gradient at the clean batch, if known)."""
        if not eps:
            return []
        atk, b = self.attack, x.shape[0]
        if grad0 is None and atk.shares_first_gradient():
            # Without a random start the first step's gradient is taken at the clean input for
            # every eps: compute it once for the whole ladder (FGSM's ladder is one backward pass).
            grad0, _ = input_grad(self.model, x, y, b // self.members)
        per_chunk = max(1, atk.max_batch // max(1, b)) if atk.stacks_rungs else 1
        out: list[torch.Tensor] = []
        for start in range(0, len(eps), per_chunk):
            chunk = eps[start : start + per_chunk]
            reps = (len(chunk),) + (1,) * (x.dim() - 1)
            e = torch.tensor(chunk, dtype=x.dtype, device=x.device).repeat_interleave(b)
            e = e.view(-1, *([1] * (x.dim() - 1)))  # (E·B, 1, 1, 1)
            rungs = Rungs(
                generators=[torch.Generator(device="cpu").manual_seed(self.seed) for _ in chunk],
                batch=b // self.members, grad0=grad0.repeat(reps) if grad0 is not None else None,
                early_stop=early_stop, members=self.members,
            )  # fmt: skip
            xs = x.repeat(reps)
            adv = atk.perturb(self.model, xs, y.repeat(len(chunk)), e, rungs)
            out.extend(self.within_budget(xs, adv, e).split(b))
        return out

    def within_budget(self, x: torch.Tensor, adv: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``adv`` as it is where it lies in the eps-ball (the built-in attacks always do: their
        results are unchanged), projected into the ball and [0, 1] where it does not."""
        name = self.attack.name
        if not isinstance(adv, torch.Tensor) or adv.shape != x.shape:
            got = tuple(adv.shape) if isinstance(adv, torch.Tensor) else type(adv).__name__
            raise AttackError(f"{name}: perturb returned {got}, not a tensor shaped {tuple(x.shape)}")
        adv = adv.detach()
        if not bool(torch.isfinite(adv).all()):
            raise AttackError(f"{name}: perturb returned NaN or infinite values")
        ops = self.attack.norm_ops
        inside = ops.within(x, adv, eps)
        if bool(inside.all()):  # the built-in attacks: nothing to project
            return adv.clamp(0, 1)
        return torch.where(inside, adv, ops.project(x, adv, eps)).clamp(0, 1)

    def survivors(
        self, x: torch.Tensor, y: torch.Tensor, eps: tuple[float, ...], grad0: torch.Tensor | None = None
    ) -> AttackResult:
        """Accuracy-only: eps ascending, each rung attacking only what survived the rung below."""
        order = sorted(range(len(eps)), key=lambda i: eps[i])
        advs: dict[int, torch.Tensor] = {}
        correct: dict[int, torch.Tensor] = {}
        current = x.clone()
        if grad0 is None and self.attack.shares_first_gradient():  # one pass gives the clean predictions too
            grad0, logits = input_grad(self.model, x, y, x.shape[0])
        else:
            with torch.no_grad():
                logits = self.model(x)
        alive = logits.argmax(1) == y
        for i in order:
            if eps[i] > 0 and bool(alive.any()):
                idx = alive.nonzero().flatten()
                g = grad0[idx] if grad0 is not None else None
                (adv,) = self.ladder(x[idx], y[idx], [eps[i]], early_stop=True, grad0=g)
                current = current.clone()
                current[idx] = adv
                with torch.no_grad():
                    alive[idx] = self.model(adv).argmax(1) == y[idx]
            advs[i], correct[i] = current, alive.clone()
        return AttackResult(eps, [advs[i] for i in range(len(eps))], [correct[i] for i in range(len(eps))])


# --------------------------------------------------------------------------- gradients


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradient of the cross-entropy summed over rows and divided by ``batch``, and the logits.

    Dividing by the unstacked batch size B (not the E·B stacked rows) gives every row exactly the
    gradient of a mean-loss attack on B examples, as torchattacks computes it; this matters for L2
    steps, whose normalization adds a small constant to the gradient norm. Under
    :func:`robustse.core.passes.pass_rows` the rows go through in chunks.
    """
    return by_pass_rows(lambda xc, yc: _chunk_grad(model, xc, yc, batch), x, y)


def by_pass_rows(
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
    if x.is_contiguous() and not grad.is_contiguous():  # channels_last weights: give x's layout back
        grad = grad.contiguous()
    return grad, logits.detach()
