"""The ``robustse`` command line (click).

User errors (``RobustseError`` with exit code 2, and click usage errors) print one line,
``error: <message>``, on stderr and exit 2; failures of the run itself exit 1. No traceback
for anything the user can fix.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import click

from robustse.core.errors import RobustseError, SpecError
from robustse.core.jsonout import dumps as strict_json

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int) -> NoReturn:
    first = " ".join(str(message).split())  # one line, whatever the message held
    click.echo(f"error: {first}", err=True)
    sys.exit(code)


class RobustseGroup(click.Group):
    """A click group that maps errors to one stderr line and an exit code."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not sys.warnoptions:  # library warnings would add lines to one-line errors; -W shows them
            warnings.simplefilter("ignore")
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            _fail("aborted", 1)
        except click.ClickException as exc:
            message = exc.format_message()
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                message = f"{message} (see '{exc.ctx.command_path} --help')"
            _fail(message, exc.exit_code)
        except RobustseError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted (finished work is saved; rerun the same command to resume)", 130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; Ctrl-C is caught here, before click turns it into a blank line and
        "aborted" with exit 1."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _fail("interrupted (finished work is saved; rerun the same command to resume)", 130)


class Ctx:
    """Global options shared by every command."""

    def __init__(self, device: str, seed: int, quiet: bool) -> None:
        self.device_name, self.seed, self.quiet = device, seed, quiet
        self.verbose = False

    @property
    def device(self):
        from robustse.core.device import resolve_device

        return resolve_device(self.device_name)

    def distributed(self):
        """(layout, device) of this process: joins the process group when launched by torchrun."""
        from robustse.core.distributed import init_from_env, shutdown

        layout, device = init_from_env(self.device)
        if layout.active:
            click.get_current_context().call_on_close(shutdown)
            if not layout.is_main:
                self.quiet = True  # one voice: rank 0 prints progress and results
        return layout, device

    def log(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    @property
    def debug(self):
        """A logger for --verbose detail, or None."""
        return self.log if self.verbose and not self.quiet else None


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(cls=RobustseGroup, context_settings=CONTEXT)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where to run: auto (CUDA when present), cpu, cuda or cuda:N.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**31 - 1),
    default=0,
    show_default=True,
    help="Seed for initialization, order and attacks.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines; results only.")
@click.option("--verbose", "-v", is_flag=True, help="More log lines (per cell: accuracy and time).")
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="MODULE_OR_FILE",
    help="Import a module (or a .py file) that registers attacks before the command runs; repeatable. "
    "Installed packages with a 'robustse.attacks' entry point load without it.",
)
@click.version_option(package_name="robustse")
@click.pass_context
def cli(ctx: click.Context, device: str, seed: int, quiet: bool, verbose: bool, plugins: tuple[str, ...]) -> None:
    """robustse: does Squeeze-and-Excitation gating damp adversarial perturbations?

    Shell completion (bash): eval "$(_ROBUSTSE_COMPLETE=bash_source robustse)"; zsh and fish:
    zsh_source, fish_source.
    """
    import re

    from robustse.core.errors import DeviceError

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):  # availability is checked when a command needs it
        raise DeviceError(f"unknown device {device!r} (valid: auto, cpu, cuda, cuda:N)")
    ctx.obj = Ctx(device, seed, quiet)
    ctx.obj.verbose = verbose and not quiet
    if plugins:
        from robustse.attacks import load_plugin

        for plugin in plugins:
            load_plugin(plugin)


# --------------------------------------------------------------------------- shared options


class DatasetName(click.ParamType):
    """A registered dataset name or ``imagefolder:<DIR>``."""

    name = "dataset"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from robustse.data.datasets import list_datasets

        text = str(value)
        if text in list_datasets() or (text.startswith("imagefolder:") and len(text) > len("imagefolder:")):
            return text
        self.fail(f"{text!r} is not one of {', '.join(list_datasets())} or imagefolder:DIR", param, ctx)


def dataset_option(fn: Any) -> Any:
    """--dataset NAME|imagefolder:DIR."""
    return click.option(
        "--dataset",
        type=DatasetName(),
        default=None,
        help="Dataset: a registered name or imagefolder:DIR (default: fashion-mnist, or the checkpoint's).",
    )(fn)


def data_options(fn: Any) -> Any:
    """--dataset, --data-root, --download, --eval-subset."""
    fn = click.option(
        "--eval-subset",
        type=click.IntRange(min=1),
        default=None,
        help="Evaluate on this many test images (seeded subset).",
    )(fn)
    fn = click.option("--download", is_flag=True, help="Let torchvision download missing files.")(fn)
    fn = click.option(
        "--data-root",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Folder with the dataset files (default: $ROBUSTSE_DATA, system locations).",
    )(fn)
    return dataset_option(fn)


def num_classes_option(help: str, default: int | None = 10) -> Any:
    """--num-classes with a command-specific help line."""
    return click.option(
        "--num-classes", type=click.IntRange(min=1), default=default, show_default=default is not None, help=help
    )


# --------------------------------------------------------------------------- commands


@cli.command("models")
@click.argument("pattern", default="*")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_cmd(pattern: str, as_json: bool) -> None:
    """List registered architectures matching PATTERN (a glob, e.g. '*resnet*')."""
    from robustse.models import create_model, list_models, model_info
    from robustse.models.gates import find_gates

    rows = []
    for name in list_models(pattern):
        info = model_info(name)
        model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            {
                "name": name,
                "twin": info.twin,
                "kind": info.kind,
                "se": info.has_se,
                "gates": len(find_gates(model)),
                "params": params,
                "options": sorted(info.options()),
                "description": info.description,
            }
        )
    if as_json:
        click.echo(strict_json(rows))
        return
    if not rows:
        click.echo(f"no architecture matches {pattern!r}")
        return
    click.echo(f"{'name':<18} {'twin':<18} {'gates':>5} {'params':>9}  description")
    for r in rows:
        click.echo(f"{r['name']:<18} {r['twin']:<18} {r['gates']:>5} {r['params']:>9,}  {r['description']}")
    click.echo("External: torchvision:<name> (any torchvision classifier, weights from your checkpoint).")


def _looks_like_path(target: str) -> bool:
    return Path(target).exists() or target.endswith((".safetensors", ".pt", ".pth", ".bin")) or "/" in target


def _arch_and_weights(target: str, arch: str | None) -> tuple[str, str | None]:
    """``ARCH=WEIGHTS`` (as sweep and drift take foreign weights) → (WEIGHTS, ARCH); a checkpoint
    path (and ``--arch``) as they are."""
    from robustse.experiment.setup import arch_and_weights

    foreign = arch_and_weights(target) if arch is None else None
    return (foreign[1], foreign[0]) if foreign else (target, arch)


@cli.command("inspect")
@click.argument("target")
@num_classes_option("Classes, when TARGET is an architecture name or ARCH=WEIGHTS.")
@click.option("--in-channels", type=click.IntRange(min=1), default=None, help="Input channels (name only).")
@click.option("--arch", default=None, help="Architecture of a foreign .pt/.pth checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(target: str, num_classes: int, in_channels: int | None, arch: str | None, as_json: bool) -> None:
    """Show layers, parameters and SE gates of an architecture NAME, a CHECKPOINT file, or foreign
    weights as ARCH=WEIGHTS."""
    from robustse.models import Block, create_model
    from robustse.models.checkpoint import load_checkpoint
    from robustse.models.gates import find_gates, gate_channels

    meta: dict[str, Any] = {}
    path, arch = _arch_and_weights(target, arch)
    if path != target or _looks_like_path(target):
        model, meta = load_checkpoint(path, arch=arch, arch_kwargs={"num_classes": num_classes})
    else:
        kwargs: dict[str, Any] = {"num_classes": num_classes}
        if in_channels is not None:
            kwargs["in_channels"] = in_channels
        model = create_model(target, **kwargs)
    gates = find_gates(model)
    layers = []
    for name, module in model.named_modules():
        depth = name.count(".")
        if name and (depth == 0 or isinstance(module, Block)):
            layers.append(
                {"name": name, "type": type(module).__name__, "params": sum(p.numel() for p in module.parameters())}
            )
    gate_rows = []
    for name, gate in gates.items():
        channels = gate_channels(model, name)
        gate_rows.append({"name": name, "type": type(gate).__name__, "channels": channels})
    summary = {
        "target": target,
        "arch": meta.get("arch", target),
        "params": sum(p.numel() for p in model.parameters()),
        "layers": layers,
        "gates": gate_rows,
        "checkpoint": {k: v for k, v in meta.items() if k not in ("history", "fingerprint")} if meta else None,
    }
    if as_json:
        click.echo(strict_json(summary))
        return
    click.echo(f"{summary['arch']}: {summary['params']:,} parameters")
    if meta:
        for key in ("dataset", "seed", "epochs", "clean_accuracy", "eval_examples", "normalization", "weight_hash"):
            if key in meta:
                click.echo(f"  {key}: {meta[key]}")
    click.echo("layers:")
    for layer in layers:
        click.echo(f"  {layer['name']:<24} {layer['type']:<22} {layer['params']:>9,}")
    click.echo(f"SE gates found: {len(gate_rows)}" + ("" if gate_rows else " (a plain model)"))
    for g in gate_rows:
        click.echo(f"  {g['name']:<24} {g['type']:<12} C={g['channels']}")


@cli.command("train")
@click.argument("arch")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True, help="Peak learning rate."
)
@click.option("--schedule", type=click.Choice(["onecycle", "cosine"]), default="onecycle", show_default=True)
@click.option("--no-augment", is_flag=True, help="No random crops/flips (faster convergence for short runs).")
@click.option(
    "--adv-eps",
    type=click.FloatRange(min=0, max=1),
    default=0.0,
    show_default=True,
    help="Fast adversarial training (FGSM + random start) at this Linf eps, in pixels.",
)
@click.option("--reduction", type=click.IntRange(min=1), default=None, help="SE reduction ratio r (SE models).")
@click.option("--squeeze", type=click.Choice(["avg", "max"]), default=None, help="SE squeeze (SE models).")
@click.option("--gate", type=click.Choice(["sigmoid", "hardsigmoid"]), default=None, help="SE gate (SE models).")
@click.option("--amp", is_flag=True, help="Mixed precision for training (bf16 on CPU, fp16 on CUDA).")
@data_options
@click.option("--train-subset", type=click.IntRange(min=1), default=None, help="Train on this many images (seeded).")
@click.option(
    "--image-size",
    type=click.IntRange(min=8, max=1024),
    default=None,
    help="imagefolder:DIR only: train and evaluate on square images of this side [default: 64].",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint file [default: reports/models/<arch>_s<seed>.safetensors].",
)
@pass_ctx
def train_cmd(
    obj: Ctx,
    arch: str,
    epochs: int,
    batch_size: int,
    lr: float,
    schedule: str,
    no_augment: bool,
    adv_eps: float,
    reduction: int | None,
    squeeze: str | None,
    gate: str | None,
    amp: bool,
    dataset: str | None,
    data_root: Path | None,
    download: bool,
    eval_subset: int | None,
    train_subset: int | None,
    image_size: int | None,
    out: Path | None,
) -> None:
    """Train architecture ARCH and save a checkpoint (resumes if interrupted; DDP under torchrun)."""
    from robustse.core.config import DataConfig, TrainConfig
    from robustse.core.errors import ModelError
    from robustse.models import model_info
    from robustse.training.train import train_model

    se_kwargs = {k: v for k, v in {"reduction": reduction, "squeeze": squeeze, "gate": gate}.items() if v is not None}
    if se_kwargs and ":" not in arch:  # torchvision:/timm: models take no SE options
        info = model_info(arch)
        refused = [k for k in se_kwargs if k not in info.options()]
        if refused:
            raise ModelError(f"{arch} has no SE blocks: --{refused[0]} applies to its SE twin se_{info.family}")
    data = DataConfig(
        dataset=dataset or "fashion-mnist",
        data_root=str(data_root) if data_root else None,
        download=download,
        train_subset=train_subset,
        eval_subset=eval_subset,
        image_size=image_size,
    )
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        schedule=schedule,  # type: ignore[arg-type]
        augment=not no_augment,
        adv_eps=adv_eps,
        amp=amp,
    )
    layout, device = obj.distributed()
    if out is None:
        out = Path("reports") / "models" / f"{arch.replace(':', '-')}_s{obj.seed}.safetensors"
    result = train_model(
        arch,
        out=out,
        data=data,
        train=cfg,
        seed=obj.seed,
        model_kwargs=se_kwargs,
        device=device,
        progress=not obj.quiet,
        log=obj.log,
        layout=layout,
    )
    if not layout.is_main:
        return
    _echo_accuracy(arch, result.meta, extra=f"{epochs} epochs, {result.meta['train_seconds']:.1f}s train")
    click.echo(f"checkpoint: {result.checkpoint}")


def _echo_accuracy(label: str, meta: dict[str, Any], *, extra: str = "") -> None:
    from robustse.analysis.stats import wilson_interval

    n, acc = int(meta["eval_examples"]), float(meta["clean_accuracy"])
    lo, hi = wilson_interval(round(acc * n), n)
    tail = f", {extra}" if extra else ""
    click.echo(f"{label}: clean accuracy {acc:.4f} (95% CI {lo:.4f}-{hi:.4f}, n={n}{tail})")


@cli.command("eval")
@click.argument("checkpoint")
@data_options
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--arch", default=None, help="Architecture of a foreign .pt/.pth checkpoint.")
@num_classes_option("Classes of a foreign checkpoint [default: the dataset's, or 10].", default=None)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def eval_cmd(
    obj: Ctx,
    checkpoint: str,
    dataset: str | None,
    data_root: Path | None,
    download: bool,
    eval_subset: int | None,
    batch_size: int,
    arch: str | None,
    num_classes: int | None,
    as_json: bool,
) -> None:
    """Clean test accuracy of CHECKPOINT (or foreign weights as ARCH=WEIGHTS), with a 95% Wilson
    interval."""
    from robustse.core.errors import DataError
    from robustse.data.datasets import load_split
    from robustse.data.folder import ImageFolder
    from robustse.experiment.setup import fit_probe, given_dataset
    from robustse.models.checkpoint import load_checkpoint
    from robustse.training.predict import check_input_fits, predict
    from robustse.training.train import SUBSET_SEED

    device = obj.device
    path, arch = _arch_and_weights(checkpoint, arch)
    test, classes = given_dataset(dataset, num_classes, data_root, download)
    model, meta = load_checkpoint(path, arch=arch, arch_kwargs={"num_classes": classes}, map_location=device)
    name = dataset or meta.get("dataset") or "fashion-mnist"
    preprocess = getattr(model, "preprocess", None)
    if test is None:
        test = load_split(name, split="test", root=data_root, download=download, preprocess=preprocess)
    elif isinstance(test, ImageFolder) and preprocess is not None:
        test.preprocess = preprocess
    if len(test) == 0:
        raise DataError(f"{name}: the test split is empty")
    channels = meta.get("arch_kwargs", {}).get("in_channels")
    check_input_fits(model, fit_probe(test, eval_subset), device=device, channels=channels)  # before decoding
    ds = test.subset(eval_subset, seed=SUBSET_SEED)
    from robustse.experiment.setup import nonfinite_weights

    bad = nonfinite_weights(model)
    if bad:
        click.echo(f"warning: {checkpoint}: {bad} non-finite weight value(s)", err=True)
    preds = predict(model, ds, batch_size=batch_size, device=device)
    correct = int((preds == ds.y).sum())
    result = {
        "checkpoint": str(checkpoint),
        "arch": meta.get("arch"),
        "dataset": name,
        "eval_examples": len(ds),
        "clean_accuracy": correct / len(ds),
    }
    if as_json:
        from robustse.analysis.stats import wilson_interval

        result["ci95"] = list(wilson_interval(correct, len(ds)))
        click.echo(strict_json(result))
        return
    _echo_accuracy(f"{meta.get('arch')} on {name}", result)


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
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def attacks_cmd(as_json: bool) -> None:
    """List the attacks and their options (defaults shown)."""
    from robustse.attacks import attack_info, list_attacks

    infos = [attack_info(n) for n in list_attacks()]
    rows: list[dict[str, Any]] = [
        {"name": i.name, "role": i.role, "description": i.description, "options": i.options()} for i in infos
    ]
    if as_json:
        click.echo(strict_json(rows))
        return
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        click.echo(f"{r['name']:<7} {r['description']} [{r['role']}]\n        options: {opts}")
    click.echo("torchattacks:<Name>  any torchattacks attack with an eps budget, e.g. 'torchattacks:APGD(steps=10)';")
    click.echo("        its own keyword options; eps comes from the ladder")


def _sweep_summary(result: Any) -> None:
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
    help="Take attacks, epsilons and options from this spec's [sweep] table.",
)
@click.option(
    "--attack",
    "attack_texts",
    multiple=True,
    help="Attack, repeatable: fgsm, 'pgd(steps=20,restarts=2)', noise, 'torchattacks:APGD(steps=10)'.",
)
@click.option("--eps", "eps_text", default=None, help="Ladder: 0,0.01,0.03 or start:stop:step [default: spec's].")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default=None, help="Default norm of the attacks.")
@click.option("--eval-subset", type=click.IntRange(min=1), default=None, help="Attack this many test images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option(
    "--pass-rows",
    type=click.IntRange(min=1),
    default=None,
    help="Gradients and probes this many rows at a time: less memory, same results up to rounding "
    "(default: as many as fit 512 MiB of autograd graph on a CPU, a quarter of a GPU's memory).",
)
@click.option("--accuracy-only", is_flag=True, default=None, help="Larger eps attack only the survivors.")
@click.option(
    "--probes/--no-probes",
    default=None,
    help="Record sensitivity, gate/block drift and gate interventions per cell [default: on].",
)
@click.option(
    "--channels-last/--no-channels-last",
    default=None,
    help="Attack in channels_last memory layout: faster on CPU, equal up to float rounding [default: off].",
)
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
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/sweep"), show_default=True)
@click.option("--strict", is_flag=True, help="Exit 1 if a sanity check fails.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
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
    seed_batching: bool | None,
    interventions: tuple[str, ...],
    num_classes: int | None,
    dataset: str | None,
    data_root: Path | None,
    out: Path,
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
        "seed_batching": seed_batching, "pass_rows": pass_rows,
    }  # fmt: skip
    cfg = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    paths = list(checkpoints) or list(cfg.models)
    if not paths:
        raise SpecError("no models: pass CHECKPOINT paths or list sweep.models in the spec")
    layout, device = obj.distributed()
    result = sweep_checkpoints(
        paths, cfg, out, data_root=data_root, num_classes=num_classes, dataset=dataset, device=device,
        progress=not obj.quiet, log=obj.log, debug=obj.debug, layout=layout,
    )  # fmt: skip
    if layout.is_main:
        _report_sweep(result, as_json=as_json, strict=strict)


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
        click.echo(strict_json(payload))
    else:
        _sweep_summary(result)
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
@click.option("--eps", type=click.FloatRange(min=0, min_open=True), default=0.02, show_default=True)
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--eval-subset", type=click.IntRange(min=1), default=500, show_default=True)
@dataset_option
@num_classes_option("Classes of a foreign ARCH=WEIGHTS model [default: the dataset's, or 10].", default=None)
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a figure (PNG).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
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
    (attack,) = build_attacks([parse_attack(attack_text)], norm=norm, seed=obj.seed, noise=False)
    rows = measure_drift(sm.model, ds.x, ds.y, attack=attack, eps=eps)
    if plot is not None:
        try:
            plot_drift(rows, str(plot))
        except OSError as exc:
            raise SpecError(f"cannot write {plot} ({exc.strerror or exc})") from None
    if as_json:
        click.echo(strict_json(rows))
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
        _sweep_summary(result.sweep)
    if result.report is not None:
        _verdict_summary(result.report)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    click.echo(f"run directory: {result.out_dir} ({timings})")


def _verdict_summary(rep: Any) -> None:
    """The report's Answer and its verdict table, one line per measurement and eps."""
    from robustse.analysis.answer import QUESTION
    from robustse.analysis.report import headline, in_pp

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


def main() -> None:
    """Console-script entry point."""
    from robustse.core.allocator import tune_allocator

    tune_allocator()
    for stream in (sys.stdout, sys.stderr):  # a path of raw bytes prints as \xff escapes, never a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    cli(prog_name="robustse")
