"""Stage 4 of the report: ``report.html`` (the Jinja2 template ``templates/report.html.j2``, one
self-contained file) and ``report.md``, rendered from a :class:`ReportContext`; every
user-controlled string escaped for its format."""

from __future__ import annotations

import base64
import functools
import html
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustse.analysis import answer as A
from robustse.analysis import inference as I
from robustse.analysis.analyse import Analysis
from robustse.analysis.figures import ReportFigure
from robustse.analysis.rundata import ReportOptions, RunData
from robustse.core.files import write_text
from robustse.core.roles import attack_role

VERDICT_COLOURS = {
    "SE damps": "#1a7f37", "SE amplifies": "#cf222e", "equivalent": "#0969da", "inconclusive": "#6e7781",
    "too few seeds": "#8c959f", "reaction hurts": "#cf222e", "reaction helps": "#1a7f37",
    "attack damped more": "#1a7f37", "noise damped more": "#cf222e", "negligible": "#57606a",
    "attack attenuated more": "#1a7f37", "noise attenuated more": "#9a6700", "SE lower": "#1a7f37",
    "SE higher": "#cf222e", "Yes": "#1a7f37", "No": "#cf222e", "Not settled": "#6e7781",
}  # fmt: skip
STATUS_COLOURS = {"pass": "#1a7f37", "warn": "#9a6700", "fail": "#cf222e"}
NEUTRAL_COLOUR = "#6e7781"
MEASURE_NAMES = {
    "robust_accuracy": "robust accuracy",
    "logit_sensitivity": "logit sensitivity",
    "kl": "KL divergence",
    "flip_rate": "flip rate",
    "amplification_last_block": "amplification (last block)",
    "log_sensitivity_vs_noise": "ln(sensitivity / noise's)",
    "logit_sensitivity_calibrated": "logit sensitivity (calibrated)",
    "kl_calibrated": "KL divergence (calibrated)",
}
# Secondary measures shown beside the primary endpoint; scale-dependent ones (logit sensitivity,
# KL) and ratios (log sensitivity vs noise) are never headlines.
HEADLINE_MEASURES = ["flip_rate", "amplification_last_block"]
STATS_COLUMNS = ["arm", "family", "baseline", "endpoint", "measurement", "attack", "eps", "se_mean", "base_mean",
                 "diff", "ci_low", "ci_high", "p_adjusted", "verdict", "n_pairs"]  # fmt: skip
RATIO_SHOWN = ["arm", "family", "measurement", "models", "comparison", "attack", "eps", "a_value", "b_value", "ratio",
               "ci_low", "ci_high", "p_adjusted", "verdict", "n_models"]  # fmt: skip
CHECK_COLUMNS = ["model", "name", "status", "detail"]
TEMPLATE = "report.html.j2"


@dataclass
class ReportContext:
    """What the renderers read (the fields are the keys of the former context dict)."""

    run: Path
    dataset: str
    models: Any
    cells: Any
    checks: Any
    groups: list[dict[str, Any]]
    comparison: Any
    damping: Any
    interventions: Any
    main: str | None
    eps: list[float]
    gallery_eps: float
    alpha: float
    n_boot: int
    manifest: dict[str, Any]
    spec: str | None
    titles: dict[str, str]
    n_examples: int
    answer: list[str] = field(default_factory=list)
    gate_effects: Any = None
    adaptive: Any = None
    primary: str = I.PRIMARY
    answers: list[A.Answer] = field(default_factory=list)
    ratios: Any = None
    out: Path | None = None

    @classmethod
    def of(cls, data: RunData, a: Analysis, opts: ReportOptions, figures: dict[str, ReportFigure]) -> ReportContext:
        """The context of the run ``data`` with its analysis and figures."""
        return cls(
            run=data.run, dataset=data.dataset, models=data.models, cells=data.cells, checks=data.checks,
            groups=a.groups, comparison=a.comparison, damping=a.damping, interventions=a.interventions, main=a.main,
            eps=a.eps, gallery_eps=a.gallery_eps, alpha=opts.alpha, n_boot=opts.n_boot, manifest=data.manifest,
            spec=data.spec, titles={k: f.title for k, f in figures.items()},
            n_examples=int(data.examples.idx.nunique()), answer=a.answer, gate_effects=a.gate_effects,
            adaptive=a.adaptive, primary=opts.primary, answers=a.answers, ratios=a.ratios, out=data.target,
        )  # fmt: skip


def write_pages(context: ReportContext, figures: dict[str, ReportFigure]) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (each atomically)."""
    html_path = (context.out or context.run) / "report.html"
    md_path = (context.out or context.run) / "report.md"
    write_text(html_path, render_html(context, {k: f.png for k, f in figures.items()}))
    write_text(md_path, render_markdown(context, {k: f.path.name for k, f in figures.items()}))
    return html_path, md_path


# --------------------------------------------------------------------------- stage 4: render


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def headline(c: Any, main: str | None) -> Any:
    """The verdict rows: per comparison group, the primary endpoint and the headline secondary
    measurements of the main attack, at every eps (``c``: :func:`robustse.analysis.inference.verdict_table`)."""
    keep = (c.endpoint == "primary") | ((c.attack == main) & c.measurement.isin(HEADLINE_MEASURES))
    return c[keep]


def _check_summary(checks: Any) -> str:
    if checks.empty:
        return "no sanity checks stored"
    counts = checks.status.value_counts()
    return ", ".join(f"{int(counts.get(s, 0))} {s}" for s in ("pass", "warn", "fail"))


def _as_context(context: ReportContext | dict[str, Any]) -> ReportContext:
    """A :class:`ReportContext`, also from the dict callers passed before it existed."""
    if isinstance(context, ReportContext):
        return context
    return ReportContext(**{f.name: context[f.name] for f in fields(ReportContext) if f.name in context})


# ---- HTML


@dataclass(frozen=True)
class HtmlTable:
    """A table for the template: column heads and rows of (text, chip colour or None) cells."""

    columns: list[str]
    rows: list[list[tuple[str, str | None]]]


@dataclass(frozen=True)
class VerdictRow:
    """One measurement of a twin group: a verdict row (a pandas row or None) per eps."""

    measurement: str
    attack: str
    cells: list[Any]


@dataclass(frozen=True)
class VerdictGroup:
    """The verdict table of one comparison: SE vs its plain twins or vs the static controls."""

    family: str
    arm: str
    baseline: str
    n_pairs: int
    eps: list[float]
    rows: list[VerdictRow]


def render_html(context: ReportContext | dict[str, Any], images: dict[str, bytes]) -> str:
    """The self-contained HTML report (figures inlined), from ``templates/report.html.j2``."""
    return _environment().get_template(TEMPLATE).render(**_html_view(_as_context(context), images))


@functools.cache
def _environment() -> Any:
    """The Jinja2 environment of the package's templates; values are escaped like :func:`html.escape`."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("robustse.analysis", "templates"), autoescape=True, finalize=_escape,
        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )  # fmt: skip
    env.filters["fmt"] = _fmt
    env.filters["g"] = lambda v: f"{v:g}"
    return env


def _escape(value: Any) -> Any:
    """Escape a value as :func:`html.escape` does (the page predates the template); markup passes."""
    from markupsafe import Markup

    return value if hasattr(value, "__html__") else Markup(html.escape(str(value)))


def _html_view(c: ReportContext, images: dict[str, bytes]) -> dict[str, Any]:
    """The template's variables."""
    return {
        "name": c.run.name, "dataset": c.dataset, "n_examples": c.n_examples, "models": ", ".join(c.models.label),
        "main": str(c.main), "check_summary": _check_summary(c.checks), "n_boot": c.n_boot, "alpha": c.alpha,
        "verdicts": _verdict_groups(in_pp(headline(c.comparison, c.main))), "has_groups": not c.comparison.empty,
        "answers": c.answers, "answer": c.answer, "primary": MEASURE_NAMES.get(c.primary, c.primary),
        "gate_effects": _html_table(in_pp(c.gate_effects)), "adaptive": _html_table(c.adaptive),
        "ratios": _html_table(c.ratios, RATIO_SHOWN), "rule": A.RULE,
        "sensitivity_parts": _html_table(sensitivity_parts(c.comparison, c.main)),
        "verdict_colours": VERDICT_COLOURS, "gallery_eps": c.gallery_eps,
        "figures": [(c.titles[k], base64.b64encode(data).decode("ascii")) for k, data in images.items()],
        "comparison": _html_table(in_pp(c.comparison), [*STATS_COLUMNS, "unit"]),
        "damping": _html_table(_damping_at(c)),
        "interventions": _html_table(c.interventions), "checks": _html_table(c.checks, CHECK_COLUMNS),
        "provenance": _provenance(c), "spec": c.spec,
    }  # fmt: skip


PP_COLUMNS = ("se_mean", "base_mean", "diff", "ci_low", "ci_high", "margin", "intervention_mean", "adaptive_mean",
              "intervention_clean", "adaptive_clean")  # fmt: skip


def in_pp(table: Any) -> Any:
    """A copy of a verdict or gate-effect table with accuracy-type rows (robust accuracy, flip rate,
    every gate-effect row) in percentage points and a ``unit`` column: one reading everywhere."""
    if table is None or table.empty:
        return table
    t = table.copy()
    rows = t.measurement.isin(I.PERCENT_MEASURES) if "measurement" in t else pd.Series(True, index=t.index)
    for col in (c for c in PP_COLUMNS if c in t):
        t[col] = t[col].astype(float)
        t.loc[rows, col] = 100 * t.loc[rows, col]
    t.insert(len(t.columns) - 1, "unit", np.where(rows, "pp", ""))
    return t


def _verdict_groups(head: Any) -> list[VerdictGroup]:
    """A verdict table per (arm, family, baseline) with headline rows."""
    out = []
    for (arm, family, baseline), rows in head.groupby(["arm", "family", "baseline"], sort=False):
        eps = sorted(set(rows.eps))
        n_pairs = int(rows.n_pairs.max())
        out.append(VerdictGroup(family, arm, baseline, n_pairs, eps, _verdict_rows(rows, eps)))
    return out


def _verdict_rows(rows: Any, eps: list[float]) -> list[VerdictRow]:
    out = []
    for (measure, attack, endpoint), r in rows.groupby(["measurement", "attack", "endpoint"], sort=False):
        by_eps = {float(x.eps): x for _, x in r.iterrows()}
        name = MEASURE_NAMES.get(measure, measure) + (" (primary)" if endpoint == "primary" else " (exploratory)")
        out.append(VerdictRow(name, attack, [by_eps.get(e) for e in eps]))
    return out


def sensitivity_parts(c: Any, main: str | None) -> Any:
    """Logit sensitivity under the main attack and under the noise control, SE and baseline side
    by side per eps: the numerator and denominator of ``log_sensitivity_vs_noise``."""
    rows = c[(c.measurement == "logit_sensitivity") & (c.endpoint == "secondary")]
    parts = []
    for name, attack in (("attack", main), ("noise", None)):
        sel = rows[rows.attack == attack] if attack else rows[rows.attack.map(attack_role) == "control"]
        keep = sel[["arm", "family", "baseline", "eps", "se_mean", "base_mean"]]
        parts.append(keep.rename(columns={"se_mean": f"se_{name}", "base_mean": f"base_{name}"}))
    if any(p.empty for p in parts):
        return None
    return parts[0].merge(parts[1], on=["arm", "family", "baseline", "eps"])


def _damping_at(c: ReportContext) -> Any:
    """The damping rows at the gallery eps."""
    damp = c.damping
    if damp is not None and not damp.empty:
        damp = damp[np.isclose(damp.eps, c.gallery_eps)]
    return damp


def _html_table(df: Any, columns: list[str] | None = None, *, digits: int = 4) -> HtmlTable | None:
    """``df``'s ``columns`` formatted for the template's table (None: the table is empty)."""
    if df is None or df.empty:
        return None
    cols = columns or list(df.columns)
    rows = [[_html_cell(col, r[col], digits) for col in cols] for _, r in df.iterrows()]
    return HtmlTable([str(col) for col in cols], rows)


def _html_cell(column: str, v: Any, digits: int) -> tuple[str, str | None]:
    """(text, chip colour): verdicts and check statuses are chips."""
    if column not in ("verdict", "status"):
        return _fmt(v, digits), None
    return _fmt(v, digits), VERDICT_COLOURS.get(str(v)) or STATUS_COLOURS.get(str(v), NEUTRAL_COLOUR)


def _provenance(c: ReportContext) -> list[tuple[str, str]]:
    """(key, JSON value) rows of the provenance table."""
    m = c.manifest
    prov = {
        "run directory": str(c.run),
        "git commit": m.get("git_commit"),
        "device": m.get("device"),
        "threads": m.get("threads"),
        "seeds": m.get("seeds"),
        "timings (s)": m.get("timings_seconds"),
        "versions": m.get("versions"),
        "cells": len(c.cells),
        "bootstrap replicates": c.n_boot,
        "alpha": c.alpha,
    }
    return [(k, json.dumps(v, default=str)) for k, v in prov.items()]


# ---- Markdown


def render_markdown(context: ReportContext | dict[str, Any], figures: dict[str, str]) -> str:
    """The Markdown report (figures linked from ``figures/``)."""
    c = _as_context(context)
    parts = (_md_verdict(c), _md_figures(c, figures), _md_statistics(c), _md_checks(c), _md_provenance(c))
    return "".join(line for part in parts for line in part)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]#!|~>])")  # table and inline markup; cells never start a line


def md_escape(value: Any) -> str:
    """One line of Markdown text that shows ``value`` literally: HTML-escaped (no tag passes),
    line breaks folded to spaces, and every Markdown and table character backslash-escaped."""
    text = " ".join(str(value).splitlines()) if value is not None else ""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)  # escape sequences shown, never run
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def _md_table(df: Any, columns: list[str] | None = None) -> str:
    if df is None or df.empty:
        return "_none_\n"
    cols = columns or list(df.columns)
    lines = ["| " + " | ".join(md_escape(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(md_escape(_fmt(r[col])) for col in cols) + " |")
    return "\n".join(lines) + "\n"


def _md_answers(c: ReportContext) -> list[str]:
    out = ["## Answer\n"]
    for a in c.answers:
        out += [
            f"### {md_escape(a.family)}, arm {md_escape(a.arm)}: {A.QUESTION}\n",
            f"**{a.bottom_line}** — {md_escape(a.reason)}\n\n",
            *(f"- {md_escape(line.text)}\n" for line in a.lines),
            "\n",
        ]
    if not c.answers:
        out.append("_No SE model in this run: nothing to answer._\n\n")
    rule = "; ".join(A.RULE)
    out.append(f"Every interval is a 95% confidence interval over seed pairs or models. Bottom-line rule: {rule}.\n\n")
    return out


def _md_verdict(c: ReportContext) -> list[str]:
    out = [
        f"# Does SE gating damp adversarial perturbations? — {md_escape(c.run.name)}\n",
        f"{md_escape(c.dataset)}, {c.n_examples} test examples; main attack **{md_escape(c.main)}**; sanity checks: "
        f"**{_check_summary(c.checks)}**.\n",
        *_md_answers(c),
        "## Verdict\n",
        "SE − baseline (plain twin, or static-gate control) over seed pairs: 95% t interval with seed-pair and "
        f"example-sampling variance; Holm within the primary endpoint ({c.primary}) and within the exploratory "
        f"rest; a direction needs the adjusted p < {c.alpha:g} and the estimate outside the margin, `negligible` is "
        "significant inside it, `equivalent` two one-sided tests within the margin, fewer than 5 pairs give "
        "`too few seeds`. Accuracy-type measures in percentage points (pp).\n",
    ]
    head = in_pp(headline(c.comparison, c.main))
    if head.empty:
        return [*out, "_No SE model with a same-seed baseline in this run: no verdict._\n"]
    effect = [f"{_fmt(d, 3)} [{_fmt(lo, 3)}, {_fmt(hi, 3)}] {u}".strip() for d, lo, hi, u in
              zip(head["diff"], head.ci_low, head.ci_high, head.unit, strict=True)]  # fmt: skip
    columns = ["arm", "family", "baseline", "endpoint", "measurement", "attack", "eps", "effect", "p_adjusted",
               "n_pairs", "verdict"]  # fmt: skip
    return [*out, _md_table(head.assign(effect=effect), columns)]


def _md_figures(c: ReportContext, figures: dict[str, str]) -> list[str]:
    return ["\n## Figures\n", *(f"![{md_escape(c.titles[k])}](figures/{name})\n" for k, name in figures.items())]


def _md_statistics(c: ReportContext) -> list[str]:
    columns = [col for col in STATS_COLUMNS if col != "p"]
    return [
        "\n## Statistics\n",
        _md_table(in_pp(c.comparison), [*columns, "unit"]),
        "\n### The gates' causal effect (intervention − adaptive, white-box; pp)\n",
        _md_table(in_pp(c.gate_effects)),
        "\n### Premise and mechanism: ratios at the seed level\n",
        _md_table(c.ratios, RATIO_SHOWN),
        "\n### Adaptive damping, attack vs noise\n",
        _md_table(c.adaptive),
        "\nFull tables: `stats.csv`, `gate_effects.csv`, `ratios.csv`, `adaptive_damping.csv`, `damping.csv` "
        "(channel gain), `interventions.csv` (transfer), `blocks.csv`, `squeeze.csv`, `results.csv` (CSV values are "
        "fractions, not pp).\n",
    ]


def _md_checks(c: ReportContext) -> list[str]:
    return ["\n## Sanity checks\n", _md_table(c.checks, CHECK_COLUMNS)]


def _md_provenance(c: ReportContext) -> list[str]:
    m = c.manifest
    return [
        "\n## Provenance\n",
        f"git commit `{m.get('git_commit')}`, device `{m.get('device')}`, seeds {m.get('seeds')}, "
        f"timings (s) {json.dumps(m.get('timings_seconds'))}, versions {json.dumps(m.get('versions'))}.\n",
    ]
