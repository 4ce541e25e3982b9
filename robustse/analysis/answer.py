"""The report's Answer (README "Reading the Answer"): per arm and family a bottom line — *Yes*,
*No* or *Not settled* to "does SE gating damp adversarial perturbations in this run?" — derived
by :func:`bottom_line` from the Outcome and Cause verdicts, then the Premise, Outcome, Cause and
Mechanism lines, each with its effect, 95% CI, the number of seed pairs or models and its verdict.
Tables in, an :class:`Answer` per (arm, family) out (no torch).

Numbers read one way everywhere: accuracies in percentage points (pp), ratios as "enlarges /
shrinks the change by x %" relative to 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

YES, NO, NOT_SETTLED = "Yes", "No", "Not settled"
QUESTION = "Does SE gating damp adversarial perturbations in this run?"
NO_EFFECT = ("equivalent", "negligible")  # no effect that clears the margin
RULE = (
    "Not settled when the outcome or the held-gates effect is missing or has fewer than 5 seed pairs",
    "No when holding the gates makes the models more robust (Cause: reaction hurts)",
    "Yes when SE damps against the plain twins (Outcome) and holding the gates loses it (Cause: reaction helps)",
    "No when SE does not damp and holding the gates changes robust accuracy by less than the margin "
    "(Cause: equivalent or negligible), or when SE amplifies without the reaction helping",
    "Not settled otherwise",
)


@dataclass(frozen=True)
class Line:
    """One line of the Answer: its sentence and the numbers behind it (None where not measured).

    ``unit`` is ``pp`` (effect and CI in percentage points) or ``ratio`` (a ratio, 1 = no change).
    """

    name: str
    text: str
    measurement: str | None = None
    eps: float | None = None
    effect: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    unit: str | None = None
    n: int | None = None
    n_of: str | None = None
    verdict: str | None = None


@dataclass(frozen=True)
class Answer:
    """The Answer of one (arm, family): the bottom line, its reason and the lines under it."""

    arm: str
    family: str
    bottom_line: str
    reason: str
    lines: list[Line] = field(default_factory=list)

    def sentences(self) -> list[str]:
        """The bottom line as a sentence, then every line's text."""
        return [f"{self.bottom_line} — {self.reason}", *(line.text for line in self.lines)]

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (NaN becomes None)."""
        return _finite(asdict(self) | {"question": QUESTION})


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


# --------------------------------------------------------------------------- reading numbers


def pp(diff: float, lo: float, hi: float) -> str:
    """An accuracy difference with its CI in percentage points: ``−1.6 pp (95% CI −3.7 to +0.6)``."""
    return f"{100 * diff:+.1f} pp (95% CI {100 * lo:+.1f} to {100 * hi:+.1f})"


def change(r: float) -> str:
    """A ratio read as a change relative to 1: ``enlarges the change by 19.0 %``."""
    if not math.isfinite(r):
        return "was not measured"
    if abs(r - 1) < 5e-4:
        return "leaves the change as it is"
    word = "enlarges" if r > 1 else "shrinks"
    return f"{word} the change by {100 * abs(r - 1):.1f} %"


def ratio_ci(r: float, lo: float, hi: float) -> str:
    """``×1.190 (95% CI 1.150 to 1.230)``."""
    return f"×{r:.3f} (95% CI {lo:.3f} to {hi:.3f})"


def _closest(table: pd.DataFrame, eps: float) -> pd.DataFrame:
    if table.empty:
        return table
    at = table.eps.iloc[(table.eps - eps).abs().to_numpy().argmin()]
    return table[table.eps == at]


# --------------------------------------------------------------------------- the lines


@dataclass(frozen=True)
class Tables:
    """What the Answer reads: the verdict table, the gate effects and the ratio table."""

    verdicts: pd.DataFrame
    gate_effects: pd.DataFrame
    ratios: pd.DataFrame
    eps: float
    primary: str
    main: str | None


def _of(t: pd.DataFrame, arm: str, family: str) -> pd.DataFrame:
    return t[(t.arm == arm) & (t.family == family)] if not t.empty else t


def premise(t: Tables, arm: str, family: str) -> Line:
    """Squeeze attenuation of the SE models under the main attack vs the noise control."""
    r = _of(t.ratios, arm, family)
    se = _closest(r[(r.measurement == "squeeze_attenuation") & (r.models == "se") & (r.attack == t.main)], t.eps)
    if se.empty:
        return Line("Premise", "Premise: not measured — no SE site was probed under an attack and the noise control.")
    x = se.iloc[0]
    plain = _closest(r[(r.measurement == "squeeze_attenuation") & (r.models == "plain") & (r.attack == t.main)], t.eps)
    twin = _closest(
        r[(r.measurement == "squeeze_attenuation") & (r.models == "se vs plain") & (r.attack == t.main)], t.eps
    )
    text = (
        f"Premise — at eps = {x.eps:g} the squeezed global state z (the spatial mean of the SE input u) moves "
        f"{x.a_value:.3f}× as far as u itself under {x.attack} and {x.b_value:.3f}× under random noise "
        f"(geometric means of ‖z′−z‖/‖z‖ ÷ ‖u′−u‖/‖u‖); attack/noise {ratio_ci(x.ratio, x.ci_low, x.ci_high)} over "
        f"{x.n_models} SE models: {x.verdict}."
    )
    if not plain.empty:
        p = plain.iloc[0]
        text += (
            f" At the same sites of the plain twins: {p.a_value:.3f}× under {p.attack}, {p.b_value:.3f}× under noise"
        )
        if not twin.empty:
            w = twin.iloc[0]
            ci = ratio_ci(w.ratio, w.ci_low, w.ci_high)
            text += f"; SE/plain under the attack {ci} over {w.n_models} seed pairs: {w.verdict}"
        text += "."
    return Line("Premise", text, "squeeze_attenuation", float(x.eps), float(x.ratio), float(x.ci_low),
                float(x.ci_high), "ratio", int(x.n_models), "models", str(x.verdict))  # fmt: skip


def outcome(t: Tables, arm: str, family: str) -> Line:
    """The primary endpoint, SE vs plain (and vs static in the text)."""
    rows = _closest(_of(t.verdicts[t.verdicts.endpoint == "primary"], arm, family), t.eps)
    if rows.empty:
        return Line("Outcome", "Outcome: no SE model has a plain twin or static control with the same seed here.")
    name = t.primary.replace("_", " ") + (" (worst case over the attacks)" if t.primary == "robust_accuracy" else "")
    percent = t.primary in ("robust_accuracy", "flip_rate")
    parts = []
    for r in rows.itertuples():
        effect = (
            pp(r.diff, r.ci_low, r.ci_high)
            if percent
            else f"{r.diff:+.3g} (95% CI {r.ci_low:+.3g} to {r.ci_high:+.3g})"
        )
        parts.append(
            f"SE − {r.baseline} = {effect} over {r.n_pairs} seed pairs (Holm p = {r.p_adjusted:.2g}): {r.verdict}"
        )
    text = f"Outcome — {name} at eps = {rows.eps.iloc[0]:g}: " + "; ".join(parts) + "."
    head = rows[rows.baseline == "plain"] if (rows.baseline == "plain").any() else rows
    h = head.iloc[0]
    scale = 100.0 if percent else 1.0
    return Line("Outcome", text, t.primary, float(h.eps), scale * h["diff"], scale * h.ci_low, scale * h.ci_high,
                "pp" if percent else None, int(h.n_pairs), "seed pairs", str(h.verdict))  # fmt: skip


def cause(t: Tables, arm: str, family: str) -> Line:
    """Held − adaptive gates: robust accuracy with every gate held at s(x), attacked white-box."""
    rows = _closest(_of(t.gate_effects[t.gate_effects.intervention == "held_gates"], arm, family), t.eps)
    if rows.empty:
        return Line("Cause", "Cause: not measured — the sweep attacked no held-gates intervention "
                    "(list it in [sweep] interventions).")  # fmt: skip
    r = rows.iloc[0]
    text = (
        f"Cause — holding every gate at its clean value s(x) (same weights, attacked white-box) changes robust "
        f"accuracy at eps = {r.eps:g} by {pp(r['diff'], r.ci_low, r.ci_high)} over {r.n_pairs} models "
        f"(Holm p = {r.p_adjusted:.2g}): {r.verdict}."
    )
    return Line("Cause", text, "held_minus_adaptive_robust_accuracy", float(r.eps), 100 * r["diff"], 100 * r.ci_low,
                100 * r.ci_high, "pp", int(r.n_pairs), "models", str(r.verdict))  # fmt: skip


def mechanism(t: Tables, arm: str, family: str) -> Line:
    """The gates' reaction end to end (output reaction) and per gate (adaptive damping), attack vs noise."""
    r = _of(t.ratios, arm, family)
    pick = {m: _closest(r[(r.measurement == m) & (r.models == "se") & (r.attack == t.main)], t.eps)
            for m in ("output_reaction", "adaptive_damping")}  # fmt: skip
    if all(p.empty for p in pick.values()):
        return Line("Mechanism", "Mechanism: not measured — no SE model was probed (probes off, or no SE model).")
    parts, head = [], None
    for m, what in (("output_reaction", "the logits"), ("adaptive_damping", "each SE block's output")):
        if pick[m].empty:
            continue
        x = pick[m].iloc[0]
        head = head if head is not None else x
        parts.append(
            f"at {what} the gates' reaction {change(x.a_value)} under {x.attack} and {change(x.b_value)} under random "
            f"noise (attack/noise {ratio_ci(x.ratio, x.ci_low, x.ci_high)}, {x.n_models} models: {x.verdict})"
        )
    assert head is not None
    text = f"Mechanism — at eps = {head.eps:g}, against gates held at s(x) for the same x′: " + "; ".join(parts) + "."
    return Line("Mechanism", text, str(head.measurement), float(head.eps), float(head.ratio), float(head.ci_low),
                float(head.ci_high), "ratio", int(head.n_models), "models", str(head.verdict))  # fmt: skip


# --------------------------------------------------------------------------- the bottom line


def bottom_line(outcome_verdict: str | None, cause_verdict: str | None) -> tuple[str, str]:
    """(Yes | No | Not settled, the reason in plain words) from the Outcome verdict (SE vs plain
    on the primary endpoint) and the Cause verdict (held − adaptive gates). The rule, as README
    states it:

    * Not settled when either is missing or has ``too few seeds``;
    * No when the gates' reaction lowers robust accuracy (``reaction hurts``);
    * Yes when SE damps and the gates' reaction helps (``SE damps`` and ``reaction helps``);
    * No when SE does not damp and the reaction has no effect beyond the margin
      (Outcome not ``SE damps``, Cause ``equivalent`` or ``negligible``), or SE amplifies;
    * Not settled otherwise (an inconclusive verdict, or SE damps without the reaction's help).
    """
    o, c = outcome_verdict, cause_verdict
    if o is None or c is None:
        missing = "the outcome" if o is None else "the held-gates intervention"
        return NOT_SETTLED, f"{missing} was not measured in this run."
    if "too few seeds" in (o, c):
        return NOT_SETTLED, "fewer than 5 seed pairs: estimates and intervals only, no verdict."
    if c == "reaction hurts":
        return NO, "holding the gates at their clean values makes the models more robust: the gates' reaction hurts."
    if o == "SE damps" and c == "reaction helps":
        return (
            YES,
            "SE models are more robust than their plain twins, and holding the gates fixed loses that: "
            "the gates' reaction damps.",
        )
    if o != "SE damps" and c in NO_EFFECT:
        return NO, (f"SE models are not more robust than their plain twins ({o}), and holding the gates at their clean "
                    f"values changes robust accuracy by less than the margin ({c}).")  # fmt: skip
    if o == "SE amplifies" and c != "reaction helps":
        return NO, f"SE models are less robust than their plain twins, and the gates' reaction does not help ({c})."
    if o == "SE damps":
        return NOT_SETTLED, f"SE models are more robust, but the gates' reaction is not shown to be why ({c})."
    return NOT_SETTLED, f"the outcome ({o}) and the held-gates effect ({c}) do not decide it; more seeds would."


def answers(t: Tables, models: pd.DataFrame) -> list[Answer]:
    """An :class:`Answer` per (arm, family) of the SE models, in table order."""
    from robustse.analysis.stats import model_kinds

    se = models[model_kinds(models) == "se"]
    out = []
    for arm, family in dict.fromkeys(zip(se.arm, se.family, strict=True)):
        lines = [premise(t, arm, family), outcome(t, arm, family), cause(t, arm, family), mechanism(t, arm, family)]
        verdict, reason = bottom_line(lines[1].verdict, lines[2].verdict)
        out.append(Answer(str(arm), str(family), verdict, reason, lines))
    return out
