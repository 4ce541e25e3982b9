"""The report of a run directory: statistics, figures and tables → ``report.html`` and ``report.md``.

Everything is computed from what the run directory already holds (``results.db``, ``models.csv``,
``manifest.json``, ``spec.toml``), so ``robustse report RUN_DIR`` regenerates it without
attacking or training anything. ``report.html`` is one self-contained file (figures inlined as
PNG data URIs, no scripts, no external resources): verdict first, then the figures, the statistics
tables, the sanity-check panel and the provenance. ``report.md`` shows the same with the figures
from ``figures/``; the tables are also written as CSV. The statistics and the verdict rule are
described in the README ("Statistics and the verdict").

:func:`build_report` runs four stages, each a function of the previous one's typed output:
:func:`load_run` (→ :class:`RunData`), :func:`analyse` (→ :class:`Analysis`), :func:`draw_figures`
(→ :class:`ReportFigure` per figure) and the renderers, which read a :class:`ReportContext`:
:func:`render_html` (the Jinja2 template ``robustse/templates/report.html.j2``) and
:func:`render_markdown`.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import html
import io
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustse.analysis import answer as A
from robustse.analysis import inference as I
from robustse.analysis import plots
from robustse.analysis import ratios as R
from robustse.analysis import stats as S
from robustse.core.errors import ModelError, StoreError
from robustse.core.files import own_dir, write_bytes, write_text
from robustse.core.roles import attack_role, names_with_role, recorded_roles
from robustse.core.store import ResultsStore
from robustse.core.types import PathLike, split_intervention

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
MODEL_COLUMNS = ["label", "family", "se", "arm", "seed", "kind"]
TEMPLATE = "report.html.j2"


@dataclass
class ReportResult:
    """What :func:`build_report` wrote, and the tables behind it."""

    html: Path
    markdown: Path
    figures: dict[str, Path]
    comparison: Any
    checks: Any
    main_attack: str | None = None
    seconds: float = 0.0
    csv: dict[str, Path] = field(default_factory=dict)
    answer: list[str] = field(default_factory=list)
    answers: list[A.Answer] = field(default_factory=list)
    ratios: Any = None


@dataclass(frozen=True)
class ReportOptions:
    """The ``[report]`` options of a run (bootstrap replicates, alpha, gallery eps, resampling seed,
    primary endpoint, equivalence margins)."""

    n_boot: int
    alpha: float
    gallery_eps: float | None
    seed: int
    primary: str = I.PRIMARY
    margins: dict[str, float] = field(default_factory=dict)


@dataclass
class RunData:
    """Stage 1 (:func:`load_run`): what the run directory holds, read once."""

    run: Path
    models: pd.DataFrame
    examples: pd.DataFrame
    site_examples: pd.DataFrame
    sites: pd.DataFrame
    excitations: pd.DataFrame
    gallery: pd.DataFrame
    checks: pd.DataFrame
    cells: pd.DataFrame
    classes: list[str]
    dataset: str
    manifest: dict[str, Any]
    spec: str | None
    roles: dict[str, str] = field(default_factory=dict)  # {attack: role} as the sweeps recorded them
    out: Path | None = None  # where the report is written (default: the run directory)

    @property
    def target(self) -> Path:
        """The directory the report files go to."""
        return self.out if self.out is not None else self.run


@dataclass
class Analysis:
    """Stage 2 (:func:`analyse`): the statistics tables and the curves behind the figures."""

    comparison: pd.DataFrame  # the seed-level verdict table (robustse.analysis.inference.verdict_table)
    damping: pd.DataFrame | None
    interventions: pd.DataFrame
    groups: list[dict[str, Any]]
    main: str | None
    eps: list[float]
    gallery_eps: float
    gate_effects: pd.DataFrame
    adaptive: pd.DataFrame
    answer: list[str]
    answers: list[A.Answer]
    ratios: pd.DataFrame
    acc_curves: pd.DataFrame
    sens_curves: pd.DataFrame
    drift_sites: pd.DataFrame
    profile: pd.DataFrame


@dataclass(frozen=True)
class ReportFigure:
    """Stage 3 (:func:`draw_figures`): one figure, saved under ``figures/``."""

    title: str
    path: Path
    png: bytes


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


def build_report(
    run_dir: PathLike,
    *,
    n_boot: int | None = None,
    alpha: float | None = None,
    gallery_eps: float | None = None,
    seed: int | None = None,
    log: Callable[[str], None] | None = None,
    out_dir: PathLike | None = None,
) -> ReportResult:
    """Compute the statistics of a run directory and write its report.

    Args:
        run_dir: a directory holding ``results.db`` (from ``robustse experiment`` or ``sweep``).
        n_boot: bootstrap replicates (default: the spec's ``[report] bootstrap``, 2000).
        alpha: significance level and 1 − CI level (default 0.05).
        gallery_eps: eps of the gallery and heatmaps (default: middle of the ladder).
        seed: seed of the resampling.
        log: receives a line per phase.
        out_dir: write the report, figures and CSVs here instead of into ``run_dir`` (e.g. when
            the run directory is read-only); created if missing, never a symbolic link.

    Returns:
        :class:`ReportResult`.

    Raises:
        StoreError: no (or an unreadable) ``results.db`` in ``run_dir``, or its attacks mix norms.

    Example:
        >>> build_report("reports/quick").html  # doctest: +SKIP
        PosixPath('reports/quick/report.html')
    """
    t0 = time.perf_counter()
    data = load_run(run_dir)
    if out_dir is not None:
        data.out = own_dir(Path(out_dir))
    opts = _resolve_options(data.run, n_boot, alpha, gallery_eps, seed)
    with recorded_roles(data.roles):  # each attack counts as the role it ran with
        analysis = analyse(data, opts, log)
        figures = draw_figures(data, analysis)
        csv = write_tables(data, analysis)
        html_path, md_path = write_pages(ReportContext.of(data, analysis, opts, figures), figures)
    seconds = time.perf_counter() - t0
    if log:
        log(f"report: {html_path} ({seconds:.1f}s)")
    paths = {k: f.path for k, f in figures.items()}
    return ReportResult(
        html_path,
        md_path,
        paths,
        analysis.comparison,
        data.checks,
        analysis.main,
        seconds,
        csv,
        analysis.answer,
        analysis.answers,
        analysis.ratios,
    )


# --------------------------------------------------------------------------- options


def _report_config(run_dir: Path) -> ReportOptions:
    """The ``[report]`` options of the run's spec (defaults when there is none)."""
    from robustse.core.config import ReportConfig, load_spec

    defaults = ReportConfig()
    spec = run_dir / "spec.toml"
    if spec.exists():
        with contextlib.suppress(Exception):  # a spec from another version still leaves a reportable store
            defaults = load_spec(spec).report
    d = defaults
    return ReportOptions(d.bootstrap, d.alpha, d.gallery_eps, d.seed, d.primary, dict(d.margins))


def _resolve_options(
    run: Path, n_boot: int | None, alpha: float | None, gallery_eps: float | None, seed: int | None
) -> ReportOptions:
    """The caller's options, the spec's where the caller gave none."""
    cfg = _report_config(run)
    return ReportOptions(
        n_boot=n_boot or cfg.n_boot,
        alpha=alpha or cfg.alpha,
        gallery_eps=cfg.gallery_eps if gallery_eps is None else gallery_eps,
        seed=cfg.seed if seed is None else seed,
        primary=cfg.primary,
        margins=cfg.margins,
    )


# --------------------------------------------------------------------------- stage 1: load


def load_run(run_dir: PathLike) -> RunData:
    """Read everything the report needs from a run directory.

    Raises:
        StoreError: no (or an unreadable, or an empty) ``results.db``; or robust-accuracy attacks
            of more than one norm (the worst case and the comparisons take one norm at a time).
    """
    run = Path(run_dir)
    db = run / "results.db"
    if not db.exists() and not db.is_symlink():
        raise StoreError(f"{run}: no results.db here (run `robustse experiment` or `robustse sweep` first)")
    with ResultsStore(db, read_only=True) as store:
        data = _read_store(run, db, store)
    with recorded_roles(data.roles):
        _require_one_norm(run, data.examples)
    return data


def _read_store(run: Path, db: Path, store: ResultsStore) -> RunData:
    models = _models_table(run, store)
    examples = store.examples()
    if examples.empty:
        raise StoreError(f"{db}: no finished cells to report on")
    return RunData(
        run=run, models=models, examples=examples, site_examples=store.probe_table("site_examples"),
        sites=store.probe_table("sites"), excitations=store.probe_table("excitations"),
        gallery=store.probe_table("gallery"), checks=store.checks(), cells=store.cells(),
        classes=json.loads(store.get_meta("classes") or "[]"), dataset=store.get_meta("dataset") or "?",
        manifest=_read_json(run / "manifest.json"), spec=_read_text(run / "spec.toml"), roles=store.roles(),
    )  # fmt: skip


def _require_one_norm(run: Path, examples: pd.DataFrame) -> None:
    """Refuse robust-accuracy attacks of several norms: one message naming each attack's norms."""
    attacks = examples[examples.attack.isin(names_with_role(examples.attack, "attack"))]
    if attacks.norm.nunique() <= 1:
        return
    norms = attacks.groupby("attack", sort=False).norm.unique()
    mixed = ", ".join(f"{attack}: {'/'.join(sorted(n))}" for attack, n in norms.items())
    raise StoreError(f"{run}: this run mixes norms ({mixed}); the report compares one norm at a time")


def _models_table(run_dir: Path, store: ResultsStore) -> pd.DataFrame:
    """label, family, se, arm, seed of every model in the store (``models.csv`` if the run has one).

    Gate interventions (``<label>@held_gates``...) are not models of their own here: they are
    compared with the model they intervene on.
    """
    stored = store.models()
    stored = stored[[split_intervention(m)[1] is None for m in stored.model]]
    path = run_dir / "models.csv"
    if path.exists():
        try:
            table = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StoreError(
                f"{path}: unreadable ({reason}); restore it, or delete it to rebuild the model table from the store"
            ) from None
        if set(MODEL_COLUMNS[:-1]) <= set(table.columns):
            table["se"] = table.se.astype(str).str.lower().isin(["true", "1"])
            if "kind" not in table:  # written before the static control existed
                table["kind"] = np.where(table.se, "se", "plain")
            return table[table.label.isin(stored.model)].reset_index(drop=True)
    gated = _gated_models(store)
    rows = [_model_row(i, r, gated) for i, r in stored.iterrows()]
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


def _gated_models(store: ResultsStore) -> set[str]:
    """Models whose probes recorded channel gates."""
    sites = store.probe_table("sites")
    return set(sites[sites.kind == "gate"].model)


def _model_row(i: Any, r: Any, gated: set[str]) -> dict[str, Any]:
    """A ``models.csv`` row for a stored model, from its architecture's registry entry; an
    external model (``timm:``/``torchvision:``) is SE when its gates were recorded, and twins
    with the external model whose name differs only by an ``se``/``legacy_se`` prefix
    (``timm:seresnet50`` and ``timm:resnet50``: family ``resnet50``, seed 0)."""
    from robustse.models import model_info

    arch = r["arch"] if isinstance(r["arch"], str) else None
    try:
        info = model_info(arch) if arch else None
    except ModelError:  # foreign architecture names (torchvision:...) are not in the registry
        info = None
    m = re.search(r"_s(\d+)$", r["model"])
    if info is None and arch and ":" in arch:
        se = r["model"] in gated
        return {"label": r["model"], "family": external_family(arch), "se": se, "arm": "main",
                "seed": int(m.group(1)) if m else 0, "kind": "se" if se else "plain"}  # fmt: skip
    return {
        "label": r["model"],
        "family": info.family if info else (arch or r["model"]),
        "se": bool(info.has_se) if info else False,
        "arm": "main",
        "seed": int(m.group(1)) if m else i,
        "kind": info.kind if info else "plain",
    }


def external_family(arch: str) -> str:
    """``timm:legacy_seresnet50`` → ``resnet50``: the name without its source and SE prefix."""
    name = arch.split(":", 1)[1]
    return re.sub(r"^(legacy_)?se(?=res)", "", name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None


# --------------------------------------------------------------------------- stage 2: analyse


def analyse(data: RunData, opts: ReportOptions, log: Callable[[str], None] | None = None) -> Analysis:
    """The statistics (:mod:`robustse.analysis.stats`) and the curves the figures draw."""
    ex, models, site_ex = data.examples, data.models, data.site_examples
    kw = _resampling(opts)
    comparison = I.verdict_table(
        ex, models, site_examples=site_ex, alpha=opts.alpha, primary=opts.primary, margins=opts.margins
    )
    damp = S.damping_table(site_ex, models, **kw) if not site_ex.empty else None
    inter = S.intervention_table(ex, models, alpha=opts.alpha)
    groups = S.twin_groups(models)
    if log:
        log(f"statistics: {len(comparison)} seed-pair comparisons, {len(groups)} twin group(s)")
    eps_all = sorted(e for e in set(ex.eps) if e > 0)
    main = _main_attack(list(dict.fromkeys(ex.attack)))
    g_eps = _gallery_eps(eps_all, opts.gallery_eps)
    effects = I.gate_effect_table(ex, models, alpha=opts.alpha)
    adaptive = R.adaptive_damping_table(site_ex, models, alpha=opts.alpha)
    ratios = R.ratio_table(ex, site_ex, models, main=main, alpha=opts.alpha)
    answers = A.answers(A.Tables(comparison, effects, ratios, g_eps, opts.primary, main), models)
    return Analysis(
        comparison=comparison, damping=damp, interventions=inter, groups=groups, main=main, eps=eps_all,
        gallery_eps=g_eps, gate_effects=effects, adaptive=adaptive,
        answer=[s for a in answers for s in a.sentences()], answers=answers, ratios=ratios,
        acc_curves=_accuracy_curves(ex, models, groups, opts),
        sens_curves=_sensitivity_curves(ex, groups, main, opts), drift_sites=_drift_sites(data.sites, models, groups),
        profile=_profile(data.sites, models, main),
    )  # fmt: skip


def _resampling(opts: ReportOptions) -> dict[str, Any]:
    return {"n_boot": opts.n_boot, "alpha": opts.alpha, "seed": opts.seed}


def _gallery_eps(eps_all: list[float], wanted: float | None) -> float:
    """``wanted`` if the ladder has it, else the middle of the ladder (0 without one)."""
    if wanted is not None and wanted in eps_all:
        return wanted
    return eps_all[len(eps_all) // 2] if eps_all else 0.0


def _main_attack(attacks: list[str]) -> str | None:
    """The attack the headline figures use: PGD if present, else the first attack on the label."""
    real = names_with_role(attacks, "attack")
    if "pgd" in real:
        return "pgd"
    return real[0] if real else None


def _compared(main: str | None, names: Iterable[str]) -> list[str | None]:
    """The main attack, then the controls among ``names`` (the noise control: same norm and eps)."""
    return [main, *names_with_role(names, "control")]


def _twins(group: dict[str, Any]) -> tuple[tuple[bool, list[str]], ...]:
    return (False, group["plain"]), (True, group["se"])


def _concat(rows: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["arm", "family", "se"])


def _accuracy_curves(
    examples: pd.DataFrame, models: pd.DataFrame, groups: list[dict[str, Any]], opts: ReportOptions
) -> pd.DataFrame:
    """Worst-case robust accuracy vs eps per family member (plain, SE and, where trained, the static
    control), mean over seeds with its bootstrap CI; ``kind`` names the member."""
    worst = S.worst_case_examples(examples)
    rows = []
    for g in groups:
        members = {"plain": g["plain"], "se": g["se"], "static": _statics(models, g)}
        for kind, labels in members.items():
            if labels:
                curve = S.group_curve(worst, labels, "correct", **_resampling(opts))
                rows.append(curve.assign(arm=g["arm"], family=g["family"], se=kind == "se", kind=kind))
    return _concat(rows)


def _statics(models: pd.DataFrame, g: dict[str, Any]) -> list[str]:
    """The static controls of a twin group: its arm's, else those of the arm its plain twins came from."""
    kinds = S.model_kinds(models)
    for arm in (g["arm"], g["plain_arm"]):
        rows = models[(kinds == "static") & (models.arm == arm) & (models.family == g["family"])]
        if not rows.empty:
            return list(rows.label)
    return []


def _sensitivity_curves(
    examples: pd.DataFrame, groups: list[dict[str, Any]], main: str | None, opts: ReportOptions
) -> pd.DataFrame:
    """Logit sensitivity vs eps per twin under the main attack and under the controls."""
    subs = {}
    for attack in _compared(main, examples.attack):
        sub = examples[(examples.attack == attack) & (examples.eps > 0)]
        if not (sub.empty or sub.logit_sensitivity.isna().all()):
            subs[attack] = sub
    rows = [
        S.group_curve(sub, labels, "logit_sensitivity", **_resampling(opts)).assign(
            arm=g["arm"], family=g["family"], se=se, attack=attack
        )
        for g in groups
        for se, labels in _twins(g)
        for attack, sub in subs.items()
    ]
    return _concat(rows)


def _drift_sites(sites: pd.DataFrame, models: pd.DataFrame, groups: list[dict[str, Any]]) -> pd.DataFrame:
    """Gate drift of the SE models under every perturbation but the controls."""
    se_labels = [lab for g in groups for lab in g["se"]] or list(models[models.se].label)
    controls = names_with_role(sites.attack, "control")
    return sites[(sites.metric == "gate_drift") & sites.model.isin(se_labels) & ~sites.attack.isin(controls)]


def _profile(sites: pd.DataFrame, models: pd.DataFrame, main: str | None) -> pd.DataFrame:
    """Amplification per block under the main attack and the controls, with each model's twin columns."""
    amp = sites[(sites.metric == "amplification") & sites.attack.isin(_compared(main, sites.attack))]
    return amp.merge(models[["label", "arm", "family", "se"]].rename(columns={"label": "model"}), on="model")


# --------------------------------------------------------------------------- stage 3: figures and tables


def draw_figures(data: RunData, a: Analysis) -> dict[str, ReportFigure]:
    """Draw every figure and save it as ``figures/<key>.png``."""
    fig_dir = own_dir(data.target / "figures")
    out = {}
    for key, (title, fig) in _figures(data, a).items():
        path = fig_dir / f"{key}.png"
        out[key] = ReportFigure(title, path, _png(fig, path))
    return out


def _figures(data: RunData, a: Analysis) -> dict[str, tuple[str, Any]]:
    """key → (caption, matplotlib Figure), in report order."""
    eps = a.gallery_eps
    damping = a.damping if a.damping is not None else pd.DataFrame(columns=["eps"])
    return {
        "robust_accuracy": (
            "Outcome: robust accuracy (worst case over the attacks) vs eps for SE, plain and static, "
            "mean over seeds with 95% CI",
            plots.robust_accuracy(a.acc_curves),
        ),
        "squeeze": (
            f"Premise: how much of the feature-map change reaches the squeezed state per SE site at eps = "
            f"{eps:g} (1 = all of it), attack solid and noise dashed, SE and the same sites of the baselines",
            plots.squeeze_attenuation(_squeeze_sites(data, a), eps),
        ),
        "gate_effects": (
            "Cause: robust accuracy with the gates held (or frozen) minus adaptive, attacked white-box, "
            "in pp with 95% CI (> 0: the gates' reaction hurts)",
            plots.gate_effects(a.gate_effects),
        ),
        "reaction": (
            "Mechanism: the gates' reaction (adaptive / held gates for the same x′) under each attack and "
            "under noise, 95% CI (> 1: the reaction enlarges the change)",
            plots.reaction_ratios(a.ratios),
        ),
        "sensitivity": ("Output sensitivity vs eps: attack vs noise", plots.sensitivity(a.sens_curves)),
        "gate_drift": ("Gate drift per gate vs eps", plots.gate_drift(a.drift_sites)),
        "damping": (f"Damping per gate at eps = {eps:g}", plots.damping(damping, eps)),
        "amplification": (f"Amplification over depth at eps = {eps:g}", plots.amplification(a.profile, eps)),
        "excitations": ("Per-class mean excitations, clean vs adversarial", _excitations_figure(data, a)),
        "gallery": (f"Adversarial examples ({a.main}, eps = {eps:g})", _gallery_figure(data, a)),
        "interventions": ("Gate interventions", plots.interventions(a.interventions)),
    }


def _squeeze_sites(data: RunData, a: Analysis) -> pd.DataFrame:
    """Squeeze attenuation per (arm, family, member kind, site) under the main attack and the noise
    control at the gallery eps: the geometric mean over examples, then over the models."""
    se = data.site_examples
    if se.empty or a.main is None:
        return pd.DataFrame()
    d = se[(se.metric == "squeeze_attenuation") & np.isclose(se.eps, a.gallery_eps) & (se.value > 0)]
    d = d[(d.attack == a.main) | d.attack.map(lambda n: attack_role(n) == "control")]
    if d.empty:
        return pd.DataFrame()
    info = data.models.assign(kind=S.model_kinds(data.models))[["label", "arm", "family", "kind"]]
    d = d.assign(value=np.log(d.value.astype(float)), perturbation=np.where(d.attack == a.main, a.main, "noise"))
    per_model = d.groupby(["model", "site", "perturbation"], as_index=False, sort=False).value.mean()
    per_model = per_model.merge(info.rename(columns={"label": "model"}), on="model")
    keys = ["arm", "family", "kind", "site", "perturbation"]
    out = per_model.groupby(keys, as_index=False, sort=False).value.mean()
    return out.assign(value=np.exp(out.value))


def _excitations_figure(data: RunData, a: Analysis) -> Any:
    maps = _heatmaps(data.excitations, a.groups, a.main, a.gallery_eps, data.classes)
    return plots.excitation_heatmaps(maps, _class_names(data.classes), a.gallery_eps)


def _gallery_figure(data: RunData, a: Analysis) -> Any:
    items = _gallery(data.gallery, data.examples, a.groups, a.main, a.gallery_eps, data.classes)
    return plots.gallery(items, magnify=0.5 / max(a.gallery_eps, 1e-6))


def _png(fig: Any, path: Path) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    data = buf.getvalue()
    write_bytes(path, data)
    return data


def _image(blob: bytes, shape: str) -> np.ndarray:
    img = np.frombuffer(blob, dtype=np.float32).reshape(json.loads(shape))
    return img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))


def _class_names(classes: list[str]) -> list[str]:
    return [str(c) for c in classes] if classes else [str(i) for i in range(10)]


def _heatmaps(exc: Any, groups: list[dict[str, Any]], attack: str | None, eps: float, classes: list[str]):
    """(gate, clean (K, C), adversarial (K, C)) for the first and last gate of the first SE group."""
    if exc.empty or not groups or attack is None:
        return []
    sub = exc[exc.model.isin(groups[0]["se"]) & (exc.attack == attack)]
    gates = list(dict.fromkeys(sub.site))
    k = len(classes) if classes else int(sub.label.max()) + 1
    out = []
    for gate in dict.fromkeys([gates[0], gates[-1]] if gates else []):
        clean, adv = (_class_means(sub[(sub.site == gate) & np.isclose(sub.eps, e)], k) for e in (0.0, eps))
        out.append((gate, clean, adv))
    return out


def _class_means(t: Any, k: int) -> np.ndarray:
    """(k, channels) mean excitation per class over the models (NaN where a class has none)."""
    vecs: dict[int, list[np.ndarray]] = {}
    for _, r in t.iterrows():
        vecs.setdefault(int(r.label), []).append(np.asarray(json.loads(r["mean"])))
    width = len(next(iter(vecs.values()))[0]) if vecs else 1
    m = np.full((k, width), np.nan)
    for c, vs in vecs.items():
        if c < k:
            m[c] = np.mean(vs, axis=0)
    return m


def _gallery(gal: Any, ex: Any, groups: list[dict[str, Any]], attack: str | None, eps: float, classes: list[str]):
    """Gallery items for the first SE model and its first plain twin: up to 3 examples each."""
    if gal.empty or not groups or attack is None:
        return []
    names = _class_names(classes)
    items = []
    for model in (groups[0]["se"][0], groups[0]["plain"][0]):
        g = gal[(gal.model == model) & (gal.attack == attack)]
        clean = g[g.eps == 0].set_index("idx")
        adv = g[np.isclose(g.eps, eps)].set_index("idx")
        e = ex[(ex.model == model) & (ex.attack == attack) & np.isclose(ex.eps, eps)].set_index("idx")
        items += [_gallery_item(model, clean, adv, e, idx, names) for idx in list(adv.index)[:3]
                  if idx in clean.index and idx in e.index]  # fmt: skip
    return items


def _gallery_item(model: str, clean: Any, adv: Any, e: Any, idx: Any, names: list[str]) -> dict[str, Any]:
    def name(i: int) -> str:
        return names[i] if 0 <= i < len(names) else str(i)

    return {
        "model": model,
        "clean": _image(clean.loc[idx, "image"], clean.loc[idx, "shape"]),
        "adv": _image(adv.loc[idx, "image"], adv.loc[idx, "shape"]),
        "label": name(int(e.loc[idx, "label"])),
        "clean_pred": name(int(e.loc[idx, "clean_pred"])),
        "adv_pred": name(int(e.loc[idx, "adv_pred"])),
    }


def write_tables(data: RunData, a: Analysis) -> dict[str, Path]:
    """Write ``stats.csv`` (the seed-level verdicts), ``gate_effects.csv``, ``adaptive_damping.csv``,
    ``damping.csv`` (channel gain), ``interventions.csv`` (transfer), ``blocks.csv`` (every probed
    site's summary per cell), ``squeeze.csv`` (its SE-site rows: the premise) and ``ratios.csv``
    (premise and mechanism ratios at the seed level)."""
    run = data.target
    csv = {
        "stats": run / "stats.csv",
        "gate_effects": run / "gate_effects.csv",
        "adaptive_damping": run / "adaptive_damping.csv",
        "damping": run / "damping.csv",
        "interventions": run / "interventions.csv",
        "blocks": run / "blocks.csv",
        "squeeze": run / "squeeze.csv",
        "ratios": run / "ratios.csv",
    }
    sites = data.sites.drop(columns=["cell_id"], errors="ignore")
    tables = {
        "stats": a.comparison, "gate_effects": a.gate_effects, "adaptive_damping": a.adaptive,
        "damping": a.damping if a.damping is not None else pd.DataFrame(), "interventions": a.interventions,
        "blocks": sites, "squeeze": sites[sites.kind == "squeeze"] if "kind" in sites else sites.iloc[:0],
        "ratios": a.ratios,
    }  # fmt: skip
    for key, table in tables.items():
        write_text(csv[key], table.to_csv(index=False))
    return csv


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
