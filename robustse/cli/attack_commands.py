"""Commands that attack: ``attacks`` (the registry), ``sweep`` and ``drift``, and the parsers of
their ``--attack`` and ``--eps`` texts."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click

from robustse.cli.group import (
    Ctx,
    cli,
    data_root_option,
    dataset_option,
    emit_json,
    json_option,
    num_classes_option,
    pass_ctx,
    seed_option,
)
from robustse.core.config import SweepConfig
from robustse.core.errors import SpecError

_DEFAULTS = SweepConfig()  # shown in --help
_DEFAULT_LADDER = ",".join(f"{e:g}" for e in _DEFAULTS.epsilons)
_DEFAULT_ATTACKS = " and ".join(str(a["name"]) for a in _DEFAULTS.attacks)


def parse_attack(text: str) -> dict[str, Any]:
    """``pgd`` or ``pgd(steps=20,restarts=2)`` → ``{"name": "pgd", "steps": 20, "restarts": 2}``.

    Values are read as TOML scalars (numbers, true/false, quoted or bare strings).
    """
    import tomllib

    from robustse.core.errors import AttackError

    text = text.strip()
    name, _, rest = text.partition("(")
    spec: dict[str, Any] = {"name": name.strip()}
    if rest:
        if not rest.endswith(")"):
            raise AttackError(f"attack {text!r}: expected NAME(key=value,...)")
        for part in filter(None, (p.strip() for p in rest[:-1].split(","))):
            key, eq, raw = part.partition("=")
            if not eq or not key.strip():
                raise AttackError(f"attack {text!r}: option {part!r} is not key=value")
            try:
                value = tomllib.loads(f"v = {raw.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                value = raw.strip()
            except RecursionError:
                raise AttackError(f"attack {text!r}: option {key.strip()!r} is nested too deeply") from None
            spec[key.strip()] = value
    if not spec["name"]:
        raise AttackError(f"attack {text!r}: missing name")
    return spec


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``0,0.01,0.03`` or ``0.01:0.05:0.01`` (start:stop:step, stop included) → floats."""
    from robustse.core.errors import AttackError
    from robustse.core.types import MAX_RUNGS

    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not all(math.isfinite(v) for v in (start, stop, step)) or step <= 0:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            if count > MAX_RUNGS:
                raise AttackError(f"--eps {text!r} makes {count:,} epsilons; the limit is {MAX_RUNGS:,}")
            return tuple(round(start + i * step, 10) for i in range(count))
        values = [v for v in text.split(",") if v.strip()]
        if len(values) > MAX_RUNGS:
            raise AttackError(f"--eps lists {len(values):,} epsilons; the limit is {MAX_RUNGS:,}")
        return tuple(float(v) for v in values)
    except ValueError:
        raise AttackError(f"--eps {text!r}: expected numbers like 0,0.01,0.03 or start:stop:step") from None


@cli.command("attacks")
@json_option
def attacks_cmd(as_json: bool) -> None:
    """List the attacks and their options (defaults shown)."""
    from robustse.attacks import attack_info, list_attacks

    infos = [attack_info(n) for n in list_attacks()]
    rows: list[dict[str, Any]] = [
        {"name": i.name, "role": i.role, "description": i.description, "options": i.options()} for i in infos
    ]
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        click.echo(f"{r['name']:<7} {r['description']} [{r['role']}]\n        options: {opts}")
    click.echo("torchattacks:<Name>  any torchattacks attack with an eps budget, e.g. 'torchattacks:APGD(steps=10)';")
    click.echo("        its own keyword options; eps comes from the ladder")


def sweep_summary(result: Any) -> None:
    robust = result.robust
    click.echo("robust accuracy (worst case over attacks, noise excluded), 95% Wilson CI:")
    click.echo(f"  {'model':<20} {'norm':<5} {'eps':>7} {'acc':>7}  CI")
    for _, r in robust.iterrows():
        click.echo(f"  {r.model:<20} {r.norm:<5} {r.eps:>7.4g} {r.accuracy:>7.4f}  {r.ci_low:.4f}-{r.ci_high:.4f}")
    click.echo("sanity checks:")
    for c in result.checks:
        click.echo(f"  {c.status.upper():<4} {c.model:<20} {c.name:<28} {c.detail}")
    click.echo(
        f"results: {result.out_dir / 'results.db'} ({result.computed_cells} new cells), "
        f"{result.out_dir / 'results.csv'}"
    )


@cli.command("sweep")
@click.argument("checkpoints", nargs=-1)
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Take attacks, epsilons and options from this spec's [sweep] table [default: the built-in defaults].",
)
@click.option(
    "--attack",
    "attack_texts",
    multiple=True,
    help="Attack, repeatable: fgsm, 'pgd(steps=20,restarts=2)', noise, 'torchattacks:APGD(steps=10)' "
    f"[default: the spec's, else {_DEFAULT_ATTACKS}; a noise control is added per norm].",
)
@click.option(
    "--eps", "eps_text", default=None,
    help=f"Ladder: 0,0.01,0.03 or start:stop:step [default: the spec's, else {_DEFAULT_LADDER}].",
)  # fmt: skip
@click.option(
    "--norm", type=click.Choice(["linf", "l2"]), default=None,
    help="Norm of the attacks that do not name one [default: the spec's, else linf].",
)  # fmt: skip
@click.option(
    "--eval-subset", type=click.IntRange(min=1), default=None,
    help="Attack this many test images (a seeded subset) [default: the spec's, else 1000].",
)  # fmt: skip
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=None,
    help="Images per attack call [default: the spec's, else 256].",
)  # fmt: skip
@click.option(
    "--pass-rows",
    type=click.IntRange(min=1),
    default=None,
    help="Gradients and probes this many rows at a time: less memory, same results up to rounding "
    "[default: as many as fit 512 MiB of autograd graph on a CPU, a quarter of a GPU's memory].",
)
@click.option(
    "--accuracy-only", is_flag=True, default=None,
    help="Larger eps attack only the survivors (robust accuracy only, no probes) [default: the spec's, else off].",
)  # fmt: skip
@click.option(
    "--probes/--no-probes",
    default=None,
    help="Record sensitivity, gate/block drift and gate interventions per cell [default: on].",
)
@click.option(
    "--channels-last/--no-channels-last",
    default=None,
    help="Convert the models to channels_last for the whole sweep (the attacks' gradient passes use it on "
    "a CPU anyway): predictions and probes too, equal up to float rounding [default: off].",
)
@click.option(
    "--compile", "compile_mode", type=click.Choice(["auto", "on", "off"]), default=None,
    help="Run the attacks' gradient passes through torch.compile; auto: where measured to pay (on a CPU, "
    "ResNet-20 family models planning 3,000+ passes). Probes and gate interventions stay eager; same results "
    "up to rounding [default: the spec's, else auto].",
)  # fmt: skip
@click.option(
    "--seed-batching/--no-seed-batching",
    default=None,
    help="Attack the seeds of one architecture at once through one stacked network [default: on a GPU only].",
)
@click.option(
    "--intervention",
    "interventions",
    type=click.Choice(["held_gates", "frozen_mean"]),
    multiple=True,
    help="Also attack each SE model with its gates held at their clean values (held_gates) or fixed "
    "to training-set means (frozen_mean), white-box, as models of their own. Repeatable.",
)
@num_classes_option("Classes of foreign ARCH=WEIGHTS models [default: the dataset's, or 10].", default=None)
@dataset_option
@data_root_option
@seed_option("Seed of the attacks' random starts and noise [default: the spec's, else 0].", default=None)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None,
    help="Run directory [default: reports/sweep-<name of the first model>-<digest of the models>, so unrelated "
    "sweeps never share a store; rerunning the same models reuses it].",
)  # fmt: skip
@click.option("--strict", is_flag=True, help="Exit 1 if a sanity check fails.")
@json_option
@pass_ctx
def sweep_cmd(
    obj: Ctx,
    checkpoints: tuple[str, ...],
    spec_path: Path | None,
    attack_texts: tuple[str, ...],
    eps_text: str | None,
    norm: str | None,
    eval_subset: int | None,
    batch_size: int | None,
    pass_rows: int | None,
    accuracy_only: bool | None,
    probes: bool | None,
    channels_last: bool | None,
    compile_mode: str | None,
    seed_batching: bool | None,
    interventions: tuple[str, ...],
    num_classes: int | None,
    dataset: str | None,
    data_root: Path | None,
    seed: int | None,
    out: Path | None,
    strict: bool,
    as_json: bool,
) -> None:
    """Attack CHECKPOINTS with every attack at every eps; resumable (rerun to continue).

    A CHECKPOINT is a robustse .safetensors file, a glob of them, or ARCH=WEIGHTS for foreign
    weights of a registry, torchvision or timm architecture (e.g. resnet20=weights.pth,
    timm:seresnet50=w.safetensors; .pt/.pth are loaded with weights_only).

    Records per example the label, clean and adversarial prediction, correctness and margins in
    OUT/results.db (SQLite) and OUT/results.csv, then runs the sanity checks.
    """
    import dataclasses

    from robustse.experiment.setup import sweep_checkpoints

    base = _spec_sweep(spec_path)
    overrides = {
        "attacks": tuple(parse_attack(t) for t in attack_texts) or None,
        "epsilons": None if eps_text is None else parse_epsilons(eps_text),
        "norm": norm, "eval_subset": eval_subset, "batch_size": batch_size, "accuracy_only": accuracy_only,
        "probes": probes, "channels_last": channels_last, "interventions": interventions or None,
        "seed_batching": seed_batching, "pass_rows": pass_rows, "seed": seed, "compile": compile_mode,
    }  # fmt: skip
    cfg = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    paths = list(checkpoints) or list(cfg.models)
    if not paths:
        raise SpecError("no models: pass CHECKPOINT paths or list sweep.models in the spec")
    if out is None:  # the summary (and --json's "out") says where it went
        out = default_sweep_dir(paths)
    layout, device = obj.distributed()
    result = sweep_checkpoints(
        paths, cfg, out, data_root=data_root, num_classes=num_classes, dataset=dataset, device=device,
        progress=not obj.quiet, log=obj.log, debug=obj.debug, layout=layout,
    )  # fmt: skip
    if layout.is_main:
        _report_sweep(result, as_json=as_json, strict=strict)


def default_sweep_dir(models: list[str]) -> Path:
    """``reports/sweep-<first model's name>-<digest>``: the digest is of the models as given (paths
    and ARCH=WEIGHTS texts, order kept), so the same models always land in the same store and other
    models never do."""
    import hashlib
    import re

    digest = hashlib.sha256("\0".join(models).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    stem = Path(models[0].split("=")[-1]).stem or "models"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)[:40].strip("-.") or "models"
    return Path("reports") / f"sweep-{stem}-{digest}"


def _spec_sweep(spec_path: Path | None) -> Any:
    """The spec's ``[sweep]`` table, or the defaults without a spec."""
    from robustse.core.config import SweepConfig, load_spec

    cfg = SweepConfig()
    if spec_path is not None:
        spec = load_spec(spec_path)
        if spec.sweep is None:
            raise SpecError(f"{spec_path}: no [sweep] table")
        cfg = spec.sweep
    return cfg


def _report_sweep(result: Any, *, as_json: bool, strict: bool) -> None:
    """Print a sweep's summary (or JSON); with ``strict``, exit 1 if a sanity check failed."""
    import dataclasses

    if as_json:
        payload = {
            "robust": result.robust.to_dict(orient="records"),
            "checks": [dataclasses.asdict(c) for c in result.checks],
            "out": str(result.out_dir),
        }
        emit_json(payload)
    else:
        sweep_summary(result)
    if strict and any(c.status == "fail" for c in result.checks):
        failed = [f"{c.model}:{c.name}" for c in result.checks if c.status == "fail"]
        click.echo(f"error: sanity check(s) failed: {', '.join(failed)}", err=True)
        sys.exit(1)


@cli.command("drift")
@click.argument("checkpoint")
@click.option(
    "--attack",
    "attack_text",
    default="pgd",
    show_default=True,
    help="Attack: NAME or NAME(key=value,...), as for sweep.",
)
@click.option(
    "--eps", type=click.FloatRange(min=0, min_open=True), default=0.02, show_default=True,
    help="The perturbation budget, in pixel units of the norm.",
)  # fmt: skip
@click.option(
    "--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True, help="Norm of the budget."
)
@click.option(
    "--eval-subset", type=click.IntRange(min=1), default=1000, show_default=True,
    help="Measure on this many test images (a seeded subset).",
)  # fmt: skip
@dataset_option
@num_classes_option("Classes of a foreign ARCH=WEIGHTS model [default: the dataset's, or 10].", default=None)
@data_root_option
@seed_option("Seed of the attack's random start and of the noise.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a figure (PNG) here [default: no figure].",
)
@json_option
@pass_ctx
def drift_cmd(
    obj: Ctx,
    checkpoint: str,
    attack_text: str,
    eps: float,
    norm: str,
    eval_subset: int,
    dataset: str | None,
    num_classes: int | None,
    data_root: Path | None,
    seed: int,
    plot: Path | None,
    as_json: bool,
) -> None:
    """Per-gate excitation drift, SE input/output drift, channel gain and adaptive damping of
    CHECKPOINT at one eps, adversarial vs the random-noise control; block amplification for every
    model."""
    from robustse.attacks import check_epsilons
    from robustse.core.config import SweepConfig
    from robustse.experiment.drift import measure_drift, plot_drift
    from robustse.experiment.setup import load_drift_input
    from robustse.experiment.sweep import build_attacks

    check_epsilons([eps], norm)
    device = obj.device
    sm, ds = load_drift_input(checkpoint, SweepConfig(eval_subset=eval_subset), dataset, num_classes, data_root, device)
    (attack,) = build_attacks([parse_attack(attack_text)], norm=norm, seed=seed, noise=False)
    rows = measure_drift(sm.model, ds.x, ds.y, attack=attack, eps=eps)
    if plot is not None:
        try:
            plot_drift(rows, str(plot))
        except OSError as exc:
            raise SpecError(f"cannot write {plot} ({exc.strerror or exc})") from None
    if as_json:
        emit_json(rows)
        return
    gates = [r for r in rows if r["kind"] == "gate"]
    head = {r["perturbation"]: r for r in rows}
    for label, r in head.items():
        click.echo(
            f"{label:<8} eps={eps:g}: logit sensitivity {r['logit_sensitivity']:.3f}, flip rate {r['flip_rate']:.3f}"
        )
    if gates:
        click.echo(
            f"{'gate':<26} {'pert.':<7} {'gate drift':>10} {'cosine':>8} {'in drift':>9} {'out drift':>9} "
            f"{'ch. gain':>8} {'adapt. damping':>14}"
        )
        for r in gates:
            click.echo(
                f"{r['site']:<26} {r['perturbation']:<7} {r['gate_drift']:>10.4f} {r['gate_cosine']:>8.5f} "
                f"{r['input_drift']:>9.4f} {r['output_drift']:>9.4f} {r['channel_gain']:>8.4f} "
                f"{r['adaptive_damping']:>14.4f}"
            )
    else:
        click.echo("no SE gates (a plain model): amplification only")
    click.echo(f"{'block':<26} " + " ".join(f"{lab:>10}" for lab in head) + "   (amplification)")
    for site in dict.fromkeys(r["site"] for r in rows if r["kind"] == "block"):
        vals = [
            next(r["amplification"] for r in rows if r["site"] == site and r["perturbation"] == lab) for lab in head
        ]
        click.echo(f"{site:<26} " + " ".join(f"{v:>10.3f}" for v in vals))
    if plot is not None:
        click.echo(f"figure: {plot}")
