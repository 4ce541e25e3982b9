"""Commands for whole runs: ``experiment`` (train, sweep, report from a spec) and ``report``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from robustse.cli.attack_commands import sweep_summary
from robustse.cli.group import Ctx, cli, pass_ctx
from robustse.core.jsonout import dumps as strict_json


@cli.command("experiment")
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(path_type=Path),
    default=Path("attacks/quick.toml"),
    show_default=True,
    help="Experiment spec (TOML; schema in attacks/README.md).",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Run directory [default: reports/<spec name>]."
)
@pass_ctx
def experiment_cmd(obj: Ctx, spec_path: Path, out: Path | None) -> None:
    """Train the spec's twin pairs over its seeds, then run its [sweep] (resumable)."""
    from robustse.experiment.pipeline import run_experiment

    layout, device = obj.distributed()
    result = run_experiment(spec_path, out, device=device, progress=not obj.quiet, log=obj.log, layout=layout)
    if not layout.is_main:
        return
    click.echo(f"{'model':<22} {'seed':>4} {'clean acc':>9}  {'95% CI':<15} {'train s':>8}")
    for r in result.rows:
        click.echo(
            f"{r.label:<22} {r.seed:>4} {r.clean_accuracy:>9.4f}  {r.ci_low:.4f}-{r.ci_high:.4f} "
            f"{r.train_seconds:>8.1f}"
        )
    if result.sweep is not None:
        sweep_summary(result.sweep)
    if result.report is not None:
        _verdict_summary(result.report)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    click.echo(f"run directory: {result.out_dir} ({timings})")


def _verdict_summary(rep: Any) -> None:
    """The report's Answer and its verdict table, one line per measurement and eps."""
    from robustse.analysis.answer import QUESTION
    from robustse.analysis.render import headline, in_pp

    for a in rep.answers:
        click.echo(f"[{a.family}, arm {a.arm}] {QUESTION} {a.bottom_line} — {a.reason}")
        for line in a.lines:
            click.echo(f"  {line.text}")
    c = in_pp(headline(rep.comparison, rep.main_attack))
    if c.empty:
        click.echo("verdict: no SE model with a same-seed baseline to compare")
    else:
        click.echo("verdict (SE − baseline over seed pairs, 95% CI, Holm-adjusted p; every measurement in the report):")
        for _, r in c.iterrows():
            click.echo(
                f"  {r.arm:<8} {r.family:<12} vs {r.baseline:<7} {r.endpoint:<9} {r.measurement:<25} {r.attack:<10} "
                f"eps={r.eps:<6g} {r['diff']:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}] {r.unit:<2} "
                f"p={r.p_adjusted:.3g} "
                f"pairs={r.n_pairs}  {r.verdict}"
            )
    click.echo(f"report: {rep.html} and {rep.markdown.name}")


@cli.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--bootstrap",
    type=click.IntRange(min=100, max=100_000),
    default=None,
    help="Bootstrap replicates [default: spec's, 2000].",
)
@click.option("--alpha", type=click.FloatRange(0, 0.5, min_open=True, max_open=True), default=None)
@click.option("--gallery-eps", type=float, default=None, help="Eps of the gallery and heatmaps [default: middle].")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the Answer (bottom line and lines), the verdict and ratio tables as strict JSON.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the report, figures and CSVs into this directory [default: RUN_DIR].",
)
@pass_ctx
def report_cmd(
    obj: Ctx,
    run_dir: Path,
    bootstrap: int | None,
    alpha: float | None,
    gallery_eps: float | None,
    as_json: bool,
    out_dir: Path | None,
) -> None:
    """Compute the statistics and write RUN_DIR/report.html, report.md, figures/ and the CSVs from the
    results store (no attack or training is rerun)."""
    from robustse.analysis.report import build_report

    rep = build_report(run_dir, n_boot=bootstrap, alpha=alpha, gallery_eps=gallery_eps, log=obj.log, out_dir=out_dir)
    if as_json:
        payload = {
            "report": str(rep.html),
            "answers": [a.as_dict() for a in rep.answers],
            "comparisons": rep.comparison.to_dict(orient="records"),
            "ratios": rep.ratios.to_dict(orient="records") if rep.ratios is not None else [],
        }
        click.echo(strict_json(payload))
    else:
        _verdict_summary(rep)
