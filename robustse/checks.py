"""Evaluation sanity checks, after Carlini et al., "On Evaluating Adversarial Robustness" (2019).

Computed from the results store after every sweep, stored in its ``checks`` table and shown in
every report as pass / warn / fail. A failed check means the numbers cannot be trusted as
robustness evidence (a broken attack, gradient masking, a model that outputs probabilities...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .store import ResultsStore

Status = Literal["pass", "warn", "fail"]
GRADIENT_ATTACKS = ("fgsm", "pgd")
BUDGET_TOL = 1e-6


@dataclass(frozen=True)
class Check:
    """One check's outcome for one model (``model = "*"`` for run-wide checks)."""

    model: str
    name: str
    status: Status
    detail: str


def run_checks(
    store: ResultsStore,
    *,
    num_classes: int,
    models: Sequence[str] | None = None,
    attack_keys: Sequence[str] | None = None,
    examples: Any = None,
) -> list[Check]:
    """Run every check on the store's contents (optionally only some models and attacks).

    ``examples``: the store's :meth:`~robustse.store.ResultsStore.examples` table if the caller
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
        mc = cells[cells.model == name]
        me = ex[ex.model == name]
        out += _model_checks(name, m, mc, me, num_classes)
    return out


def _model_checks(name, m, cells, ex, num_classes: int) -> list[Check]:  # type: ignore[no-untyped-def]
    checks: list[Check] = []

    def add(check: str, ok: bool, detail: str, *, warn_only: bool = False) -> None:
        status: Status = "pass" if ok else ("warn" if warn_only else "fail")
        checks.append(Check(name, check, status, detail))

    n, clean = int(m["n"]), int(m["clean_correct"])
    # eps = 0 reproduces clean accuracy, per example
    zero = ex[ex.eps == 0]
    bad = int((zero.adv_pred != zero.clean_pred).sum())
    if zero.empty:
        add("eps0_equals_clean", False, "no eps = 0 cell: add 0 to the ladder to test this", warn_only=True)
    else:
        add(
            "eps0_equals_clean",
            bad == 0,
            f"{bad} example(s) change prediction at eps = 0"
            if bad
            else f"eps = 0 reproduces clean accuracy {clean / n:.4f} on every attack",
        )
    # budgets and box
    over = cells[
        ((cells.norm == "linf") & (cells.max_linf > cells.eps + BUDGET_TOL))
        | ((cells.norm == "l2") & (cells.max_l2 > cells.eps + BUDGET_TOL))
        | (cells.min_pixel < 0)
        | (cells.max_pixel > 1)
    ]
    add(
        "perturbation_within_budget",
        over.empty,
        "every perturbation within eps (+1e-6) and inside [0, 1]"
        if over.empty
        else f"{len(over)} cell(s) outside the eps-ball or [0, 1], e.g. {over.iloc[0].attack} eps={over.iloc[0].eps}",
    )
    # finite outputs
    failed = cells[(cells.nonfinite > 0) | (cells.status != "done")]
    add(
        "no_nan_inf",
        failed.empty,
        "all logits and inputs finite"
        if failed.empty
        else f"{len(failed)} cell(s) with NaN/Inf: {failed.iloc[0].reason}",
    )
    # eval mode and logits
    add(
        "eval_mode",
        int(m["train_mode_forwards"]) == 0,
        "every forward pass ran in eval mode"
        if int(m["train_mode_forwards"]) == 0
        else f"{int(m['train_mode_forwards'])} forward pass(es) in train mode",
    )
    add(
        "outputs_are_logits",
        not bool(m["probability_like"]),
        "outputs are unnormalized logits"
        if not m["probability_like"]
        else "outputs look like probabilities (rows in [0, 1] summing to 1): attacks need logits",
    )
    zg = float(m["zero_grad_fraction"])
    add(
        "nonzero_input_gradients",
        zg <= 0.01,
        f"{zg:.1%} of examples have an all-zero input gradient",
        warn_only=zg <= 0.5,
    )

    acc = cells.assign(acc=cells.correct / cells.n)
    grad = acc[acc.attack.isin(GRADIENT_ATTACKS) | acc.attack.str.startswith("torchattacks:")]
    # accuracy non-increasing in eps, per attack
    rises = []
    for _key, g in grad.groupby("attack_key"):
        g = g.sort_values("eps")
        diffs = g.acc.diff().dropna()
        if (diffs > 1.0 / max(1, n)).any():
            rises.append(str(g.attack.iloc[0]))
    add(
        "accuracy_non_increasing",
        not rises,
        "robust accuracy never rises with eps"
        if not rises
        else f"robust accuracy rises with eps for {', '.join(sorted(set(rises)))} (gradient masking?)",
        warn_only=True,
    )
    # PGD at least as strong as FGSM
    pgd, fgsm = ex[ex.attack == "pgd"], ex[ex.attack == "fgsm"]
    if not pgd.empty and not fgsm.empty:
        merged = pgd.merge(fgsm, on=["eps", "norm", "idx"], suffixes=("_pgd", "_fgsm"))
        merged = merged[merged.eps > 0]
        viol = int(((merged.correct_pgd == 1) & (merged.correct_fgsm == 0)).sum())
        frac = viol / max(1, len(merged))
        add(
            "pgd_stronger_than_fgsm",
            frac <= 0.01,
            f"{viol} example-eps pair(s) ({frac:.2%}) fooled by FGSM but not by PGD",
            warn_only=frac <= 0.05,
        )
    # near chance at the largest eps, per norm (eps of different norms are not comparable)
    chance = 1.0 / num_classes
    for norm, g in grad.groupby("norm"):
        top = g[g.eps == g.eps.max()]
        best = float(top.acc.min())
        ok = best <= chance + 0.1
        add(
            f"near_chance_at_largest_eps[{norm}]" if grad.norm.nunique() > 1 else "near_chance_at_largest_eps",
            ok,
            f"strongest {norm} attack leaves {best:.3f} accuracy at eps = {float(top.eps.iloc[0]):g} (chance "
            f"{chance:.2f})" + ("" if ok else ": gradient masking suspected, or the ladder stops too early"),
            warn_only=True,
        )
    # noise weaker than the attack
    noise = acc[acc.attack == "noise"]
    if not noise.empty and not grad.empty:
        worst = grad.groupby(["norm", "eps"]).acc.min()
        joined = noise.set_index(["norm", "eps"]).acc.to_frame("noise").join(worst.to_frame("attack"), how="inner")
        joined = joined[joined.index.get_level_values("eps") > 0]
        weaker = joined[joined.noise + 1e-9 < joined.attack]
        add(
            "noise_weaker_than_attack",
            weaker.empty,
            "random noise never beats the attacks"
            if weaker.empty
            else f"random noise beats every attack at {len(weaker)} eps (broken attack?)",
        )
    return checks
