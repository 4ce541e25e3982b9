"""The report of a run directory: statistics, figures and tables → ``report.html`` and ``report.md``.

Everything is computed from what the run directory already holds (``results.db``, ``models.csv``,
``manifest.json``, ``spec.toml``), so ``robustse report RUN_DIR`` regenerates it without
attacking or training anything. ``report.html`` is one self-contained file (figures inlined as
PNG data URIs, no scripts, no external resources): verdict first, then the figures, the statistics
tables, the sanity-check panel and the provenance. ``report.md`` shows the same with the figures
from ``figures/``; the tables are also written as CSV.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import plots
from . import stats as S
from ._types import PathLike
from .errors import ModelError, StoreError
from .store import ResultsStore

VERDICT_COLOURS = {"SE damps": "#1a7f37", "SE amplifies": "#cf222e", "no evidence": "#6e7781"}
MEASURE_NAMES = {
    "robust_accuracy": "robust accuracy",
    "logit_sensitivity": "logit sensitivity",
    "kl": "KL divergence",
    "flip_rate": "flip rate",
    "amplification_last_block": "amplification (last block)",
    "log_sensitivity_vs_noise": "ln(sensitivity / noise's)",
}


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


def _models_table(run_dir: Path, store: ResultsStore) -> pd.DataFrame:
    """label, family, se, arm, seed of every model in the store (``models.csv`` if the run has one)."""
    from .models import model_info

    stored = store.models()
    path = run_dir / "models.csv"
    if path.exists():
        table = pd.read_csv(path)
        if {"label", "family", "se", "arm", "seed"} <= set(table.columns):
            table["se"] = table.se.astype(str).str.lower().isin(["true", "1"])
            return table[table.label.isin(stored.model)].reset_index(drop=True)
    rows = []
    for i, r in stored.iterrows():
        arch = r["arch"] if isinstance(r["arch"], str) else None
        try:
            info = model_info(arch) if arch else None
        except ModelError:  # foreign architecture names (torchvision:...) are not in the registry
            info = None
        m = re.search(r"_s(\d+)$", r["model"])
        rows.append(
            {
                "label": r["model"],
                "family": info.family if info else (arch or r["model"]),
                "se": bool(info.has_se) if info else False,
                "arm": "main",
                "seed": int(m.group(1)) if m else i,
            }
        )
    return pd.DataFrame(rows, columns=["label", "family", "se", "arm", "seed"])


def _report_config(run_dir: Path) -> dict[str, Any]:
    """The ``[report]`` options of the run's spec (defaults when there is none)."""
    from .config import ReportConfig, load_spec

    defaults = ReportConfig()
    spec = run_dir / "spec.toml"
    if spec.exists():
        with contextlib.suppress(Exception):  # a spec from another version still leaves a reportable store
            defaults = load_spec(spec).report
    return {
        "n_boot": defaults.bootstrap,
        "alpha": defaults.alpha,
        "gallery_eps": defaults.gallery_eps,
        "seed": defaults.seed,
    }


def _main_attack(attacks: list[str]) -> str | None:
    """The attack the headline figures use: PGD if present, else the first non-control attack."""
    real = [a for a in attacks if a not in S.CONTROLS]
    if "pgd" in real:
        return "pgd"
    return real[0] if real else None


def _png(fig: Any, path: Path) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def _image(blob: bytes, shape: str) -> np.ndarray:
    img = np.frombuffer(blob, dtype=np.float32).reshape(json.loads(shape))
    return img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))


def build_report(
    run_dir: PathLike,
    *,
    n_boot: int | None = None,
    alpha: float | None = None,
    gallery_eps: float | None = None,
    seed: int | None = None,
    log: Callable[[str], None] | None = None,
) -> ReportResult:
    """Compute the statistics of a run directory and write its report.

    Args:
        run_dir: a directory holding ``results.db`` (from ``robustse experiment`` or ``sweep``).
        n_boot: bootstrap replicates (default: the spec's ``[report] bootstrap``, 2000).
        alpha: significance level and 1 − CI level (default 0.05).
        gallery_eps: eps of the gallery and heatmaps (default: middle of the ladder).
        seed: seed of the resampling.
        log: receives a line per phase.

    Returns:
        :class:`ReportResult`.

    Raises:
        StoreError: no (or an unreadable) ``results.db`` in ``run_dir``.

    Example:
        >>> build_report("reports/quick").html  # doctest: +SKIP
        PosixPath('reports/quick/report.html')
    """
    t0 = time.perf_counter()
    run = Path(run_dir)
    db = run / "results.db"
    if not db.is_file():
        raise StoreError(f"{run}: no results.db here (run `robustse experiment` or `robustse sweep` first)")
    cfg = _report_config(run)
    n_boot = n_boot or cfg["n_boot"]
    alpha = alpha or cfg["alpha"]
    seed = cfg["seed"] if seed is None else seed
    with ResultsStore(db) as store:
        models = _models_table(run, store)
        examples = store.examples()
        if examples.empty:
            raise StoreError(f"{db}: no finished cells to report on")
        site_ex = store.probe_table("site_examples")
        sites = store.probe_table("sites")
        excitations = store.probe_table("excitations")
        gallery_rows = store.probe_table("gallery")
        checks = store.checks()
        cells = store.cells()
        classes = json.loads(store.get_meta("classes") or "[]")
        dataset = store.get_meta("dataset") or "?"
    eps_all = sorted(e for e in set(examples.eps) if e > 0)
    g_eps = gallery_eps if gallery_eps is not None else cfg["gallery_eps"]
    if g_eps is None or g_eps not in eps_all:
        g_eps = eps_all[len(eps_all) // 2] if eps_all else 0.0
    main = _main_attack(list(dict.fromkeys(examples.attack)))

    comparison = S.comparison_table(examples, models, site_examples=site_ex, n_boot=n_boot, alpha=alpha, seed=seed)
    damp = S.damping_table(site_ex, models, n_boot=n_boot, alpha=alpha, seed=seed) if not site_ex.empty else None
    inter = S.intervention_table(examples, models, n_boot=n_boot, alpha=alpha, seed=seed)
    groups = S.twin_groups(models)
    if log:
        log(f"statistics: {len(comparison)} comparisons, {len(groups)} twin group(s), {n_boot} bootstrap replicates")

    # ---- curves for the figures
    worst = S.worst_case_examples(examples)
    acc_rows, sens_rows = [], []
    for g in groups:
        for se, labels in ((False, g["plain"]), (True, g["se"])):
            c = S.group_curve(worst, labels, "correct", n_boot=n_boot, alpha=alpha, seed=seed)
            acc_rows.append(c.assign(arm=g["arm"], family=g["family"], se=se))
            for attack in (main, "noise"):
                sub = examples[(examples.attack == attack) & (examples.eps > 0)]
                if sub.empty or sub.logit_sensitivity.isna().all():
                    continue
                c = S.group_curve(sub, labels, "logit_sensitivity", n_boot=n_boot, alpha=alpha, seed=seed)
                sens_rows.append(c.assign(arm=g["arm"], family=g["family"], se=se, attack=attack))
    acc_curves = pd.concat(acc_rows, ignore_index=True) if acc_rows else pd.DataFrame(columns=["arm", "family", "se"])
    sens_curves = (
        pd.concat(sens_rows, ignore_index=True) if sens_rows else pd.DataFrame(columns=["arm", "family", "se"])
    )
    se_labels = [lab for g in groups for lab in g["se"]] or list(models[models.se].label)
    drift_sites = sites[(sites.metric == "gate_drift") & sites.model.isin(se_labels) & (sites.attack != "noise")]
    profile = sites[(sites.metric == "amplification") & sites.attack.isin([main, "noise"])].merge(
        models[["label", "arm", "family", "se"]].rename(columns={"label": "model"}), on="model"
    )

    # ---- figures
    fig_dir = run / "figures"
    fig_dir.mkdir(exist_ok=True)
    figs: dict[str, tuple[str, Any]] = {
        "robust_accuracy": ("Robust accuracy vs eps", plots.robust_accuracy(acc_curves)),
        "sensitivity": ("Output sensitivity vs eps: attack vs noise", plots.sensitivity(sens_curves)),
        "gate_drift": ("Gate drift per gate vs eps", plots.gate_drift(drift_sites)),
        "damping": (
            f"Damping per gate at eps = {g_eps:g}",
            plots.damping(damp if damp is not None else pd.DataFrame(columns=["eps"]), g_eps),
        ),
        "amplification": (f"Amplification over depth at eps = {g_eps:g}", plots.amplification(profile, g_eps)),
        "excitations": (
            "Per-class mean excitations, clean vs adversarial",
            plots.excitation_heatmaps(
                _heatmaps(excitations, groups, main, g_eps, classes), _class_names(classes), g_eps
            ),
        ),
        "gallery": (
            f"Adversarial examples ({main}, eps = {g_eps:g})",
            plots.gallery(
                _gallery(gallery_rows, examples, groups, main, g_eps, classes), magnify=0.5 / max(g_eps, 1e-6)
            ),
        ),
        "interventions": ("Gate interventions", plots.interventions(inter)),
    }
    images: dict[str, bytes] = {}
    paths: dict[str, Path] = {}
    for key, (_title, fig) in figs.items():
        paths[key] = fig_dir / f"{key}.png"
        images[key] = _png(fig, paths[key])

    # ---- tables
    csv = {
        "stats": run / "stats.csv",
        "damping": run / "damping.csv",
        "interventions": run / "interventions.csv",
        "blocks": run / "blocks.csv",
    }
    comparison.to_csv(csv["stats"], index=False)
    (damp if damp is not None else pd.DataFrame()).to_csv(csv["damping"], index=False)
    inter.to_csv(csv["interventions"], index=False)
    sites.drop(columns=["cell_id"], errors="ignore").to_csv(csv["blocks"], index=False)

    manifest = _read_json(run / "manifest.json")
    spec_text = (run / "spec.toml").read_text(encoding="utf-8") if (run / "spec.toml").exists() else None
    context = {
        "run": run, "dataset": dataset, "models": models, "cells": cells, "checks": checks, "groups": groups,
        "comparison": comparison, "damping": damp, "interventions": inter, "main": main, "eps": eps_all,
        "gallery_eps": g_eps, "alpha": alpha, "n_boot": n_boot, "manifest": manifest, "spec": spec_text,
        "titles": {k: v[0] for k, v in figs.items()}, "n_examples": int(examples.idx.nunique()),
    }  # fmt: skip
    html_path = run / "report.html"
    md_path = run / "report.md"
    _atomic_write(html_path, render_html(context, images))
    _atomic_write(md_path, render_markdown(context, {k: p.name for k, p in paths.items()}))
    seconds = time.perf_counter() - t0
    if log:
        log(f"report: {html_path} ({seconds:.1f}s)")
    return ReportResult(html_path, md_path, paths, comparison, checks, main, seconds, csv)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _class_names(classes: list[str]) -> list[str]:
    return [str(c) for c in classes] if classes else [str(i) for i in range(10)]


def _heatmaps(exc: Any, groups: list[dict[str, Any]], attack: str | None, eps: float, classes: list[str]):  # type: ignore[no-untyped-def]
    """(gate, clean (K, C), adversarial (K, C)) for the first and last gate of the first SE group."""
    if exc.empty or not groups or attack is None:
        return []
    labels = groups[0]["se"]
    sub = exc[exc.model.isin(labels) & (exc.attack == attack)]
    gates = list(dict.fromkeys(sub.site))
    k = len(classes) if classes else int(sub.label.max()) + 1
    out = []
    for gate in dict.fromkeys([gates[0], gates[-1]] if gates else []):
        mats = []
        for e in (0.0, eps):
            t = sub[(sub.site == gate) & np.isclose(sub.eps, e)]
            vecs: dict[int, list[np.ndarray]] = {}
            for _, r in t.iterrows():
                vecs.setdefault(int(r.label), []).append(np.asarray(json.loads(r["mean"])))
            width = len(next(iter(vecs.values()))[0]) if vecs else 1
            m = np.full((k, width), np.nan)
            for c, vs in vecs.items():
                if c < k:
                    m[c] = np.mean(vs, axis=0)
            mats.append(m)
        out.append((gate, mats[0], mats[1]))
    return out


def _gallery(gal: Any, ex: Any, groups: list[dict[str, Any]], attack: str | None, eps: float, classes: list[str]):  # type: ignore[no-untyped-def]
    """Gallery items for the first SE model and its first plain twin: up to 3 examples each."""
    if gal.empty or not groups or attack is None:
        return []
    names = _class_names(classes)

    def name(i: int) -> str:
        return names[i] if 0 <= i < len(names) else str(i)

    items = []
    for model in (groups[0]["se"][0], groups[0]["plain"][0]):
        g = gal[(gal.model == model) & (gal.attack == attack)]
        clean = g[g.eps == 0].set_index("idx")
        adv = g[np.isclose(g.eps, eps)].set_index("idx")
        e = ex[(ex.model == model) & (ex.attack == attack) & np.isclose(ex.eps, eps)].set_index("idx")
        for idx in list(adv.index)[:3]:
            if idx not in clean.index or idx not in e.index:
                continue
            items.append(
                {
                    "model": model,
                    "clean": _image(clean.loc[idx, "image"], clean.loc[idx, "shape"]),
                    "adv": _image(adv.loc[idx, "image"], adv.loc[idx, "shape"]),
                    "label": name(int(e.loc[idx, "label"])),
                    "clean_pred": name(int(e.loc[idx, "clean_pred"])),
                    "adv_pred": name(int(e.loc[idx, "adv_pred"])),
                }
            )
    return items


# --------------------------------------------------------------------------- rendering


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def headline(c: Any, main: str | None) -> Any:
    """The verdict rows: per twin group, the worst-case robust accuracy and the headline
    measurements of the main attack, at every eps (``c``: :func:`robustse.stats.comparison_table`)."""
    keep = (c.measurement == "robust_accuracy") | (
        (c.attack == main)
        & c.measurement.isin(
            ["log_sensitivity_vs_noise", "logit_sensitivity", "kl", "flip_rate", "amplification_last_block"]
        )
    )
    return c[keep]


def _verdict_cell(row: Any) -> str:
    colour = VERDICT_COLOURS[row.verdict]
    return (
        f'<td><span class="chip" style="background:{colour}">{html.escape(row.verdict)}</span><br>'
        f"<small>{_fmt(row['diff'], 3)} [{_fmt(row.ci_low, 3)}, {_fmt(row.ci_high, 3)}], p<sub>Holm</sub> "
        f"{_fmt(row.p_holm, 2)}</small></td>"
    )


def _table_html(df: Any, columns: list[str] | None = None, *, digits: int = 4) -> str:
    if df is None or df.empty:
        return "<p><em>none</em></p>"
    cols = columns or list(df.columns)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for _, r in df.iterrows():
        cells = []
        for col in cols:
            v = r[col]
            text = html.escape(_fmt(v, digits))
            if col in ("verdict", "status"):
                colour = VERDICT_COLOURS.get(str(v)) or {"pass": "#1a7f37", "warn": "#9a6700", "fail": "#cf222e"}.get(
                    str(v), "#6e7781"
                )
                text = f'<span class="chip" style="background:{colour}">{text}</span>'
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1200px;
color:#1f2328;line-height:1.45;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0} th,td{border:1px solid #d0d7de;padding:.25rem .5rem;
text-align:left;vertical-align:top} th{background:#f6f8fa}
.chip{display:inline-block;color:#fff;border-radius:.8rem;padding:.05rem .55rem;font-size:.8rem;white-space:nowrap}
figure{margin:1rem 0} figure img{max-width:100%;border:1px solid #d0d7de} figcaption{font-size:.9rem;color:#59636e}
.summary{background:#f6f8fa;border:1px solid #d0d7de;border-radius:.4rem;padding:.8rem 1rem}
pre{background:#f6f8fa;padding:.6rem;overflow:auto;font-size:.8rem}
"""


def _check_summary(checks: Any) -> str:
    if checks.empty:
        return "no sanity checks stored"
    counts = checks.status.value_counts()
    return ", ".join(f"{int(counts.get(s, 0))} {s}" for s in ("pass", "warn", "fail"))


def render_html(context: dict[str, Any], images: dict[str, bytes]) -> str:
    """The self-contained HTML report (figures inlined)."""
    c = context
    head = headline(c["comparison"], c["main"])
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>robustse report: {html.escape(c['run'].name)}</title><style>{CSS}</style></head><body>",
        f"<h1>Does SE gating damp adversarial perturbations? — <code>{html.escape(c['run'].name)}</code></h1>",
        f"<p>{html.escape(c['dataset'])}, {c['n_examples']} test examples, models: "
        f"{html.escape(', '.join(c['models'].label))}. Main attack: <b>{html.escape(str(c['main']))}</b>. "
        f"Sanity checks: <b>{_check_summary(c['checks'])}</b>.</p>",
        "<h2>Verdict</h2>",
        "<div class='summary'><p>SE − plain difference (mean over seeds and examples) with its 95% bootstrap CI "
        f"(seeds, then examples; {c['n_boot']} replicates) and the Holm-corrected paired sign-flip test across eps. "
        "<b>SE damps</b>: the CI excludes 0 on the side where SE is less affected (higher robust accuracy; lower "
        f"sensitivity, KL, flip rate, amplification) and p<sub>Holm</sub> &lt; {c['alpha']:g}; <b>SE amplifies</b>: "
        "the other side; otherwise <b>no evidence</b>.</p>",
    ]
    for g in c["groups"]:
        rows = head[(head.arm == g["arm"]) & (head.family == g["family"])]
        if rows.empty:
            continue
        eps = sorted(set(rows.eps))
        parts.append(
            f"<h3>se_{html.escape(g['family'])} vs {html.escape(g['family'])} — "
            f"arm <code>{html.escape(g['arm'])}</code>"
            f" ({len(g['se'])} SE / {len(g['plain'])} plain seeds)</h3>"
        )
        parts.append("<table><thead><tr><th>measurement</th><th>attack</th>")
        parts += [f"<th>eps {e:g}</th>" for e in eps]
        parts.append("</tr></thead><tbody>")
        for (measure, attack), r in rows.groupby(["measurement", "attack"], sort=False):
            parts.append(
                f"<tr><td>{html.escape(MEASURE_NAMES.get(measure, measure))}</td><td>{html.escape(attack)}</td>"
            )
            by_eps = {float(x.eps): x for _, x in r.iterrows()}
            parts += [_verdict_cell(by_eps[e]) if e in by_eps else "<td>–</td>" for e in eps]
            parts.append("</tr>")
        parts.append("</tbody></table>")
    if not c["groups"]:
        parts.append("<p><em>No SE/plain twin pair in this run: no verdict (figures and checks below).</em></p>")
    parts.append("</div><h2>Figures</h2>")
    for key, data in images.items():
        b64 = base64.b64encode(data).decode("ascii")
        title = html.escape(c["titles"][key])
        parts.append(
            f"<figure><img src='data:image/png;base64,{b64}' alt='{title}'><figcaption>{title}</figcaption></figure>"
        )
    parts.append("<h2>Statistics</h2><h3>SE − plain, every measurement</h3>")
    parts.append(
        _table_html(
            c["comparison"],
            [
                "arm",
                "family",
                "measurement",
                "attack",
                "eps",
                "se_mean",
                "plain_mean",
                "diff",
                "ci_low",
                "ci_high",
                "p",
                "p_holm",
                "verdict",
            ],
        )  # fmt: skip
    )
    parts.append(f"<h3>Damping per gate at eps = {c['gallery_eps']:g} (95% CI; &lt; 1 damps)</h3>")
    damp = c["damping"]
    if damp is not None and not damp.empty:
        damp = damp[np.isclose(damp.eps, c["gallery_eps"])]
    parts.append(_table_html(damp))
    parts.append("<h3>Gate interventions (intervened − as trained, paired over seeds)</h3>")
    parts.append(_table_html(c["interventions"]))
    parts.append("<h2>Sanity checks</h2>")
    parts.append(_table_html(c["checks"], ["model", "name", "status", "detail"]))
    parts.append("<h2>Provenance</h2>")
    m = c["manifest"]
    prov = {
        "run directory": str(c["run"]),
        "git commit": m.get("git_commit"),
        "device": m.get("device"),
        "threads": m.get("threads"),
        "seeds": m.get("seeds"),
        "timings (s)": m.get("timings_seconds"),
        "versions": m.get("versions"),
        "cells": len(c["cells"]),
        "bootstrap replicates": c["n_boot"],
        "alpha": c["alpha"],
    }
    parts.append("<table><tbody>")
    parts += [
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v, default=str))}</td></tr>" for k, v in prov.items()
    ]
    parts.append("</tbody></table>")
    if c["spec"]:
        parts.append(f"<h3>spec.toml</h3><pre>{html.escape(c['spec'])}</pre>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _md_table(df: Any, columns: list[str] | None = None) -> str:
    if df is None or df.empty:
        return "_none_\n"
    cols = columns or list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[col]).replace("|", "\\|") for col in cols) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(context: dict[str, Any], figures: dict[str, str]) -> str:
    """The Markdown report (figures linked from ``figures/``)."""
    c = context
    out = [
        f"# Does SE gating damp adversarial perturbations? — `{c['run'].name}`\n",
        f"{c['dataset']}, {c['n_examples']} test examples; main attack **{c['main']}**; sanity checks: "
        f"**{_check_summary(c['checks'])}**.\n",
        "## Verdict\n",
        f"SE − plain with 95% bootstrap CI (seeds, then examples; {c['n_boot']} replicates) and Holm-corrected "
        f"p (paired sign-flip test across eps); a verdict needs both the CI and p < {c['alpha']:g}.\n",
    ]
    head = headline(c["comparison"], c["main"])
    if not head.empty:
        h = head.assign(
            effect=[
                f"{_fmt(d, 3)} [{_fmt(lo, 3)}, {_fmt(hi, 3)}]"
                for d, lo, hi in zip(head["diff"], head.ci_low, head.ci_high, strict=True)
            ]
        )
        out.append(_md_table(h, ["arm", "family", "measurement", "attack", "eps", "effect", "p_holm", "verdict"]))
    else:
        out.append("_No SE/plain twin pair in this run: no verdict._\n")
    out.append("\n## Figures\n")
    out += [f"![{c['titles'][k]}](figures/{name})\n" for k, name in figures.items()]
    out.append("\n## Statistics\n")
    out.append(_md_table(c["comparison"], ["arm", "family", "measurement", "attack", "eps", "se_mean", "plain_mean",
                                           "diff", "ci_low", "ci_high", "p_holm", "verdict"]))  # fmt: skip
    out.append("\nFull tables: `stats.csv`, `damping.csv`, `interventions.csv`, `blocks.csv`, `results.csv`.\n")
    out.append("\n## Sanity checks\n")
    out.append(_md_table(c["checks"], ["model", "name", "status", "detail"]))
    m = c["manifest"]
    out.append("\n## Provenance\n")
    out.append(
        f"git commit `{m.get('git_commit')}`, device `{m.get('device')}`, seeds {m.get('seeds')}, "
        f"timings (s) {json.dumps(m.get('timings_seconds'))}, versions {json.dumps(m.get('versions'))}.\n"
    )
    return "".join(out)
