"""The report of a run directory: statistics, figures and tables → ``report.html`` and ``report.md``.

Everything is computed from what the run directory already holds (``results.db``, ``models.csv``,
``manifest.json``, ``spec.toml``), so ``robustse report RUN_DIR`` regenerates it without
attacking or training anything. ``report.html`` is one self-contained file (figures inlined as
PNG data URIs, no scripts, no external resources): verdict first, then the figures, the statistics
tables, the sanity-check panel and the provenance. ``report.md`` shows the same with the figures
from ``figures/``; the tables are also written as CSV. The statistics and the verdict rule are
described in the README ("Statistics and the verdict").

:func:`build_report` runs four stages, one module each, each a function of the previous one's typed
output: :func:`~robustse.analysis.rundata.load_run` (→ ``RunData``),
:func:`~robustse.analysis.analyse.analyse` (→ ``Analysis``),
:func:`~robustse.analysis.figures.draw_figures` (→ ``ReportFigure`` per figure) and the renderers
of :mod:`~robustse.analysis.render`, which read a ``ReportContext``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustse.analysis import answer as A
from robustse.analysis.analyse import analyse
from robustse.analysis.figures import draw_figures, write_tables
from robustse.analysis.render import ReportContext, write_pages
from robustse.analysis.rundata import load_run, resolve_options
from robustse.core.files import own_dir
from robustse.core.roles import recorded_roles
from robustse.core.types import PathLike


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
    warnings: list[str] = field(default_factory=list)  # fallbacks taken (e.g. a gallery eps off the ladder)


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
    opts = resolve_options(data.run, n_boot, alpha, gallery_eps, seed)
    stage = _stages(log)  # from here on: a refused run has said its one line already
    with recorded_roles(data.roles):  # each attack counts as the role it ran with
        stage("statistics")
        analysis = analyse(data, opts, log)
        stage("figures")
        figures = draw_figures(data, analysis)
        stage("tables and pages")
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
        analysis.warnings,
    )


REPORT_STAGES = 3


def _stages(log: Callable[[str], None] | None) -> Callable[[str], None]:
    """A function logging ``report k/3: <stage>`` as each stage of :func:`build_report` after
    reading the run starts."""
    count = iter(range(1, REPORT_STAGES + 1))

    def stage(name: str) -> None:
        k = next(count)
        if log:
            log(f"report {k}/{REPORT_STAGES}: {name}")

    return stage
