"""Evaluation sanity checks, after Carlini et al., "On Evaluating Adversarial Robustness" (2019).

Computed from the results store after every sweep, stored in its ``checks`` table and shown in
every report as pass / warn / fail (README, "Sweeps, the results store and the sanity checks"). A
failed check means the numbers cannot be trusted as robustness evidence (a broken attack, gradient
masking, a model that outputs probabilities...).

Each check is one function of a model's :class:`ModelData` returning its :class:`Check` rows;
:data:`MODEL_CHECKS` lists them in report order, so a new check is one function appended there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from robustse.core.roles import Role, names_with_role
from robustse.core.store import ResultsStore

Status = Literal["pass", "warn", "fail"]
GRADIENT_ATTACKS = ("fgsm", "pgd")  # the pair that pgd_stronger_than_fgsm compares
BUDGET_TOL = 1e-6


@dataclass(frozen=True)
class Check:
    """One check's outcome for one model (``model = "*"`` for run-wide checks)."""

    model: str
    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class ModelData:
    """What the checks of one model read: its ``models`` row, cells and per-example rows."""

    name: str
    info: Any  # the model's row of the store's models table
    cells: Any
    examples: Any
    num_classes: int

    @property
    def n(self) -> int:
        return int(self.info["n"])

    @cached_property
    def accuracy(self) -> Any:
        """The cells with their robust accuracy (``acc``)."""
        return self.cells.assign(acc=self.cells.correct / self.cells.n)

    @cached_property
    def attacks(self) -> Any:
        """Accuracy rows of the attacks on the label (role ``attack``: FGSM, PGD, torchattacks)."""
        return _with_role(self.accuracy, "attack")

    def check(self, name: str, ok: bool, detail: str, *, warn_only: bool = False) -> Check:
        """The outcome: pass if ``ok``, else warn (``warn_only``) or fail."""
        status: Status = "pass" if ok else ("warn" if warn_only else "fail")
        return Check(self.name, name, status, detail)


ModelCheck = Callable[[ModelData], list[Check]]


def run_checks(
    store: ResultsStore,
    *,
    num_classes: int,
    models: Sequence[str] | None = None,
    attack_keys: Sequence[str] | None = None,
    examples: Any = None,
) -> list[Check]:
    """Run every check on the store's contents (optionally only some models and attacks).

    ``examples``: the store's :meth:`~robustse.core.store.ResultsStore.examples` table if the caller
    has already read it (a large store is read once per sweep, not once per use).
    """
    cells = store.cells()
    ex = store.examples() if examples is None else examples
    if attack_keys is not None:
        cells = cells[cells.attack_key.isin(list(attack_keys))]
        ex = ex[ex.attack_key.isin(list(attack_keys))]
    table = store.models()
    if models is not None:
        table = table[table.model.isin(list(models))]

    out: list[Check] = []
    for _, m in table.iterrows():
        name = str(m["model"])
        out += _model_checks(name, m, cells[cells.model == name], ex[ex.model == name], num_classes)
    return out


def _model_checks(name: str, m: Any, cells: Any, ex: Any, num_classes: int) -> list[Check]:
    """Every check of :data:`MODEL_CHECKS` on one model, in order."""
    data = ModelData(name, m, cells, ex, num_classes)
    return [c for check in MODEL_CHECKS for c in check(data)]


def _with_role(table: Any, role: Role) -> Any:
    """The rows of ``table`` whose attack has ``role``."""
    return table[table.attack.isin(names_with_role(table.attack, role))]


# --------------------------------------------------------------------------- the checks


def eps0_equals_clean(d: ModelData) -> list[Check]:
    """eps = 0 reproduces clean accuracy, per example."""
    zero = d.examples[d.examples.eps == 0]
    if zero.empty:
        detail = "no eps = 0 cell: add 0 to the ladder to test this"
        return [d.check("eps0_equals_clean", False, detail, warn_only=True)]
    bad = int((zero.adv_pred != zero.clean_pred).sum())
    clean = int(d.info["clean_correct"]) / d.n
    detail = (
        f"{bad} example(s) change prediction at eps = 0"
        if bad
        else f"eps = 0 reproduces clean accuracy {clean:.4f} on every attack"
    )
    return [d.check("eps0_equals_clean", bad == 0, detail)]


def perturbation_within_budget(d: ModelData) -> list[Check]:
    """Every perturbation inside its eps-ball (+ BUDGET_TOL) and the image inside [0, 1]."""
    c = d.cells
    over = c[
        ((c.norm == "linf") & (c.max_linf > c.eps + BUDGET_TOL))
        | ((c.norm == "l2") & (c.max_l2 > c.eps + BUDGET_TOL))
        | (c.min_pixel < 0)
        | (c.max_pixel > 1)
    ]
    if over.empty:
        return [d.check("perturbation_within_budget", True, "every perturbation within eps (+1e-6) and inside [0, 1]")]
    first = over.iloc[0]
    detail = f"{len(over)} cell(s) outside the eps-ball or [0, 1], e.g. {first.attack} eps={first.eps}"
    return [d.check("perturbation_within_budget", False, detail)]


def no_nan_inf(d: ModelData) -> list[Check]:
    """Finite logits and inputs in every cell."""
    failed = d.cells[(d.cells.nonfinite > 0) | (d.cells.status != "done")]
    if failed.empty:
        return [d.check("no_nan_inf", True, "all logits and inputs finite")]
    return [d.check("no_nan_inf", False, f"{len(failed)} cell(s) with NaN/Inf: {failed.iloc[0].reason}")]


def eval_mode(d: ModelData) -> list[Check]:
    """Every forward pass in eval mode (no batch-norm statistics updated by the attacks)."""
    train = int(d.info["train_mode_forwards"])
    detail = "every forward pass ran in eval mode" if train == 0 else f"{train} forward pass(es) in train mode"
    return [d.check("eval_mode", train == 0, detail)]


def outputs_are_logits(d: ModelData) -> list[Check]:
    """The model outputs logits, not probabilities (the attacks' losses need logits)."""
    prob = d.info["probability_like"]
    detail = (
        "outputs look like probabilities (rows in [0, 1] summing to 1): attacks need logits"
        if prob
        else "outputs are unnormalized logits"
    )
    return [d.check("outputs_are_logits", not bool(prob), detail)]


def nonzero_input_gradients(d: ModelData) -> list[Check]:
    """Few all-zero input gradients (many: gradient masking); a warning up to half the examples."""
    zg = float(d.info["zero_grad_fraction"])
    detail = f"{zg:.1%} of examples have an all-zero input gradient"
    return [d.check("nonzero_input_gradients", zg <= 0.01, detail, warn_only=zg <= 0.5)]


def accuracy_non_increasing(d: ModelData) -> list[Check]:
    """Robust accuracy never rises with eps (by more than one example), per attack."""
    rises = []
    for _key, g in d.attacks.groupby("attack_key"):
        diffs = g.sort_values("eps").acc.diff().dropna()
        if (diffs > 1.0 / max(1, d.n)).any():
            rises.append(str(g.attack.iloc[0]))
    detail = (
        "robust accuracy never rises with eps"
        if not rises
        else f"robust accuracy rises with eps for {', '.join(sorted(set(rises)))} (gradient masking?)"
    )
    return [d.check("accuracy_non_increasing", not rises, detail, warn_only=True)]


def pgd_stronger_than_fgsm(d: ModelData) -> list[Check]:
    """PGD fools every example FGSM fools (a weaker PGD is broken); skipped without both."""
    fgsm, pgd = (d.examples[d.examples.attack == name] for name in GRADIENT_ATTACKS)
    if pgd.empty or fgsm.empty:
        return []
    merged = pgd.merge(fgsm, on=["eps", "norm", "idx"], suffixes=("_pgd", "_fgsm"))
    merged = merged[merged.eps > 0]
    viol = int(((merged.correct_pgd == 1) & (merged.correct_fgsm == 0)).sum())
    frac = viol / max(1, len(merged))
    detail = f"{viol} example-eps pair(s) ({frac:.2%}) fooled by FGSM but not by PGD"
    return [d.check("pgd_stronger_than_fgsm", frac <= 0.01, detail, warn_only=frac <= 0.05)]


def near_chance_at_largest_eps(d: ModelData) -> list[Check]:
    """The strongest attack nears chance accuracy at the largest eps, per norm (eps of different
    norms are not comparable)."""
    grad = d.attacks
    chance = 1.0 / d.num_classes
    out = []
    for norm, g in grad.groupby("norm"):
        top = g[g.eps == g.eps.max()]
        best = float(top.acc.min())
        ok = best <= chance + 0.1
        detail = (
            f"strongest {norm} attack leaves {best:.3f} accuracy at eps = {float(top.eps.iloc[0]):g} (chance "
            f"{chance:.2f})" + ("" if ok else ": gradient masking suspected, or the ladder stops too early")
        )
        name = f"near_chance_at_largest_eps[{norm}]" if grad.norm.nunique() > 1 else "near_chance_at_largest_eps"
        out.append(d.check(name, ok, detail, warn_only=True))
    return out


def noise_weaker_than_attack(d: ModelData) -> list[Check]:
    """The random-noise control never leaves lower accuracy than the attacks at the same norm and
    eps (if it does, the attacks are broken); skipped without a control."""
    noise, grad = _with_role(d.accuracy, "control"), d.attacks
    if noise.empty or grad.empty:
        return []
    worst = grad.groupby(["norm", "eps"]).acc.min()
    joined = noise.set_index(["norm", "eps"]).acc.to_frame("noise").join(worst.to_frame("attack"), how="inner")
    joined = joined[joined.index.get_level_values("eps") > 0]
    weaker = joined[joined.noise + 1e-9 < joined.attack]
    detail = (
        "random noise never beats the attacks"
        if weaker.empty
        else f"random noise beats every attack at {len(weaker)} eps (broken attack?)"
    )
    return [d.check("noise_weaker_than_attack", weaker.empty, detail)]


MODEL_CHECKS: list[ModelCheck] = [
    eps0_equals_clean,
    perturbation_within_budget,
    no_nan_inf,
    eval_mode,
    outputs_are_logits,
    nonzero_input_gradients,
    accuracy_non_increasing,
    pgd_stronger_than_fgsm,
    near_chance_at_largest_eps,
    noise_weaker_than_attack,
]
