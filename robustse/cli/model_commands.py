"""Commands about models: ``models``, ``inspect``, ``train`` and ``eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from robustse.cli.group import Ctx, cli, data_options, emit_json, json_option, num_classes_option, pass_ctx, seed_option


@cli.command("models")
@click.argument("pattern", default="*")
@json_option
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
        emit_json(rows)
        return
    if not rows:
        click.echo(f"no architecture matches {pattern!r}")
        return
    click.echo(f"{'name':<18} {'twin':<18} {'gates':>5} {'params':>9}  description")
    for r in rows:
        click.echo(f"{r['name']:<18} {r['twin']:<18} {r['gates']:>5} {r['params']:>9,}  {r['description']}")
    click.echo("External: torchvision:<name> (any torchvision classifier) and timm:<name> (any timm model, with")
    click.echo("the timm extra), weights from your checkpoint as ARCH=WEIGHTS.")


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
@click.option(
    "--in-channels", type=click.IntRange(min=1), default=None,
    help="Input channels, when TARGET is an architecture name [default: the architecture's].",
)  # fmt: skip
@click.option(
    "--arch", default=None, help="Architecture of a foreign .pt/.pth checkpoint [default: from its metadata]."
)
@json_option
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
        emit_json(summary)
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
@click.option(
    "--epochs", type=click.IntRange(min=1), default=5, show_default=True, help="Passes over the training set."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="Training (SGD) batch size."
)
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True, help="Peak learning rate."
)
@click.option(
    "--schedule", type=click.Choice(["onecycle", "cosine"]), default="onecycle", show_default=True,
    help="Learning-rate schedule.",
)  # fmt: skip
@click.option("--no-augment", is_flag=True, help="No random crops/flips (faster convergence for short runs).")
@click.option(
    "--adv-eps",
    type=click.FloatRange(min=0, max=1),
    default=0.0,
    show_default=True,
    help="Fast adversarial training (FGSM + random start) at this Linf eps, in pixels.",
)
@click.option(
    "--reduction", type=click.IntRange(min=1), default=None,
    help="SE reduction ratio r (SE models) [default: the architecture's].",
)  # fmt: skip
@click.option(
    "--squeeze", type=click.Choice(["avg", "max"]), default=None, help="SE squeeze (SE models) [default: avg]."
)
@click.option(
    "--gate",
    type=click.Choice(["sigmoid", "hardsigmoid"]),
    default=None,
    help="SE gate (SE models) [default: sigmoid].",
)
@click.option("--amp", is_flag=True, help="Mixed precision for training (bf16 on CPU, fp16 on CUDA).")
@click.option(
    "--compile", "compile_mode", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
    help="Run the training steps through torch.compile; auto: where measured to pay (SE and static-gate "
    "models on a CPU in the default layout, runs of at least 5,000 steps). $ROBUSTSE_COMPILE replaces auto.",
)  # fmt: skip
@click.option(
    "--channels-last", "channels_last", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
    help="Train in channels_last memory layout; auto: on a CPU (measured faster there). Same function up to "
    "float rounding.",
)  # fmt: skip
@data_options
@click.option(
    "--train-subset", type=click.IntRange(min=1), default=None,
    help="Train on this many images (a seeded subset) [default: all].",
)  # fmt: skip
@seed_option("Seed of initialization, data order and augmentation (the checkpoint's default name ends _s<seed>).")
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
@json_option
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
    compile_mode: str,
    channels_last: str,
    dataset: str | None,
    data_root: Path | None,
    download: bool,
    eval_subset: int | None,
    train_subset: int | None,
    image_size: int | None,
    seed: int,
    out: Path | None,
    as_json: bool,
) -> None:
    """Train architecture ARCH and save a checkpoint (resumes if interrupted; DDP under torchrun)."""
    from robustse.core.config import DataConfig, TrainConfig
    from robustse.training.train import train_model

    data = DataConfig(
        dataset=dataset or "fashion-mnist", data_root=str(data_root) if data_root else None, download=download,
        train_subset=train_subset, eval_subset=eval_subset, image_size=image_size,
    )  # fmt: skip
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule,  # type: ignore[arg-type]
        augment=not no_augment, adv_eps=adv_eps, amp=amp, compile=compile_mode,  # type: ignore[arg-type]
        channels_last=channels_last,  # type: ignore[arg-type]
    )  # fmt: skip
    layout, device = obj.distributed()
    if out is None:
        out = Path("reports") / "models" / f"{arch.replace(':', '-')}_s{seed}.safetensors"
    result = train_model(
        arch, out=out, data=data, train=cfg, seed=seed, model_kwargs=_se_options(arch, reduction, squeeze, gate),
        device=device, progress=not obj.quiet, log=obj.log, layout=layout,
    )  # fmt: skip
    if not layout.is_main:
        return
    if as_json:
        n, acc, lo, hi = _accuracy(result.meta)
        emit_json({"checkpoint": str(result.checkpoint), "arch": arch, "seed": seed, "epochs": epochs,
                   "eval_examples": n, "clean_accuracy": acc, "ci95": [lo, hi],
                   "train_seconds": result.meta.get("train_seconds")})  # fmt: skip
        return
    _echo_accuracy(arch, result.meta, extra=f"{epochs} epochs, {result.meta['train_seconds']:.1f}s train")
    click.echo(f"checkpoint: {result.checkpoint}")


def _se_options(arch: str, reduction: int | None, squeeze: str | None, gate: str | None) -> dict[str, Any]:
    """The SE options given on the command line; refused (ModelError) for an architecture without SE
    blocks, naming its SE twin."""
    from robustse.core.errors import ModelError
    from robustse.models import model_info

    se_kwargs = {k: v for k, v in {"reduction": reduction, "squeeze": squeeze, "gate": gate}.items() if v is not None}
    if se_kwargs and ":" not in arch:  # torchvision:/timm: models take no SE options
        info = model_info(arch)
        refused = [k for k in se_kwargs if k not in info.options()]
        if refused:
            raise ModelError(f"{arch} has no SE blocks: --{refused[0]} applies to its SE twin se_{info.family}")
    return se_kwargs


def _accuracy(meta: dict[str, Any]) -> tuple[int, float, float, float]:
    """(n, clean accuracy, 95% Wilson interval) of a checkpoint's metadata."""
    from robustse.analysis.stats import wilson_interval

    n, acc = int(meta["eval_examples"]), float(meta["clean_accuracy"])
    lo, hi = wilson_interval(round(acc * n), n)
    return n, acc, lo, hi


def _echo_accuracy(label: str, meta: dict[str, Any], *, extra: str = "") -> None:
    n, acc, lo, hi = _accuracy(meta)
    tail = f", {extra}" if extra else ""
    click.echo(f"{label}: clean accuracy {acc:.4f} (95% CI {lo:.4f}-{hi:.4f}, n={n}{tail})")


@cli.command("eval")
@click.argument("checkpoint")
@data_options
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per evaluation batch."
)
@click.option(
    "--arch", default=None, help="Architecture of a foreign .pt/.pth checkpoint [default: from its metadata]."
)
@num_classes_option("Classes of a foreign checkpoint [default: the dataset's, or 10].", default=None)
@json_option
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
        emit_json(result)
        return
    _echo_accuracy(f"{meta.get('arch')} on {name}", result)
