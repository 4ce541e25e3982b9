"""Commands for whole runs: ``experiment`` (train, sweep, report from a spec) and ``report``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from robustse.cli.attack_commands import sweep_summary
from robustse.cli.group import Ctx, cli, emit_json, json_option, pass_ctx, seed_option


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
@json_option
@pass_ctx
def experiment_cmd(obj: Ctx, spec_path: Path, out: Path | None, as_json: bool) -> None:
    """Train the spec's twin pairs over its seeds, then run its [sweep] and write the report
    (resumable: rerun to continue).

    Every seed comes from the spec (the models' seeds, [sweep] seed, [report] seed), so this
    command has no --seed: a run directory always holds one spec's results.
    """
    from robustse.experiment.pipeline import run_experiment

    layout, device = obj.distributed()
    result = run_experiment(
        spec_path, out, device=device, progress=not obj.quiet, log=obj.log, layout=layout, debug=obj.debug
    )
    if not layout.is_main:
        return
    if result.report is not None:
        _warn(result.report)
    if as_json:
        emit_json(_experiment_payload(result))
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


def _experiment_payload(result: Any) -> dict[str, Any]:
    """What ``experiment --json`` prints: the models, the sweep's worst case and checks, the Answer."""
    import dataclasses

    sweep = result.sweep
    return {
        "out": str(result.out_dir),
        "models": [dataclasses.asdict(r) for r in result.rows],
        "robust": sweep.robust.to_dict(orient="records") if sweep is not None else [],
        "checks": [dataclasses.asdict(c) for c in sweep.checks] if sweep is not None else [],
        "answers": [a.as_dict() for a in result.report.answers] if result.report is not None else [],
        "report": str(result.report.html) if result.report is not None else None,
        "timings": dict(result.timings),
    }


def _warn(rep: Any) -> None:
    """The report's fallbacks, one ``warning:`` line each on stderr (even with --quiet)."""
    for warning in rep.warnings:
        click.echo(f"warning: {warning}", err=True)


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
    help="Replicates of the descriptive bootstrap bands and the channel-gain table; the verdicts are t "
    "intervals over seed pairs and do not use it [default: the spec's [report] bootstrap, else 2000].",
)
@click.option(
    "--alpha", type=click.FloatRange(0, 0.5, min_open=True, max_open=True), default=None,
    help="Significance level; intervals are 1 − alpha [default: the spec's [report] alpha, else 0.05].",
)  # fmt: skip
@click.option(
    "--gallery-eps", type=float, default=None,
    help="Eps of the Answer, the gallery and the heatmaps; an eps off the ladder falls back to the middle "
    "rung, with a warning [default: the spec's [report] gallery_eps, else the middle rung].",
)  # fmt: skip
@seed_option("Seed of the bootstrap draws [default: the spec's [report] seed, else 0].", default=None)
@json_option
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
    seed: int | None,
    as_json: bool,
    out_dir: Path | None,
) -> None:
    """Compute the statistics and write RUN_DIR/report.html, report.md, figures/ and the CSVs from the
    results store (no attack or training is rerun)."""
    from robustse.analysis.report import build_report

    rep = build_report(
        run_dir, n_boot=bootstrap, alpha=alpha, gallery_eps=gallery_eps, seed=seed, log=obj.log, out_dir=out_dir
    )
    _warn(rep)
    if as_json:
        payload = {
            "report": str(rep.html),
            "answers": [a.as_dict() for a in rep.answers],
            "comparisons": rep.comparison.to_dict(orient="records"),
            "ratios": rep.ratios.to_dict(orient="records") if rep.ratios is not None else [],
        }
        emit_json(payload)
    else:
        _verdict_summary(rep)
