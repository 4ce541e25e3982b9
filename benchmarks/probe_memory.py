"""Peak memory and images/s of a probed PGD sweep of a full-size SE network, beside the same sweep
without probes, on real photos from an image folder.

Each configuration runs in a fresh process (its peak RSS is its own): timm ``seresnet50`` with
random weights (nothing is downloaded) at its 224x224 input, PGD with ``--steps`` steps plus the
noise control at eps 0 and ``--eps``, ``--images`` images in batches of ``--batch-size``, read from
an image folder of foolbox's 20 ImageNet photos (repeated under new names; the dev extra installs
foolbox). Also printed: the bytes of one recorded clean pass of a batch (gates, gating-block
inputs and outputs, block outputs), which a probed batch holds while it is measured.

The first two runs use the default: gradient and probe passes take as many rows as fit in the
device's pass budget (512 MiB of autograd graph on a CPU). A third run takes the whole batch in one
pass (``robustse sweep --pass-rows`` equal to the batch size), as every sweep did before the budget.
A fourth runs the real command, ``robustse sweep timm:<model>=W.safetensors --dataset
imagefolder:DIR``, on a folder with ``train/`` and ``val/`` (half as many more photos in each
beyond ``--images``): everything the first three leave out — loading the weights, the calibration
temperature fitted on held-out photos, the training-set gate means, and the ``held_gates`` and
``frozen_mean`` interventions swept beside the model (three models, so its images/s are not
comparable with the rows above; its peak RSS is).

    python benchmarks/probe_memory.py [--model seresnet50] [--batch-size 32] [--images 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def image_folder(root: Path, images: int) -> Path:
    """``images`` copies of foolbox's ImageNet photos in synset-style class folders, with classes.txt."""
    import foolbox

    photos = sorted((Path(foolbox.__file__).parent / "data").glob("imagenet_*.jpg"))
    for i in range(images):
        src = photos[i % len(photos)]
        label = int(src.stem.rsplit("_", 1)[1])
        (root / f"n{label:08d}").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / f"n{label:08d}" / f"{i:05d}_{src.name}")
    (root / "classes.txt").write_text("".join(f"n{i:08d}\n" for i in range(1000)))
    return root


def split_folder(root: Path, images: int) -> Path:
    """``root/train`` and ``root/val`` as :func:`image_folder` makes them (``images`` each), the
    class list at ``root``."""
    for split in ("train", "val"):
        image_folder(root / split, images)
        (root / split / "classes.txt").rename(root / "classes.txt")
    return root


def command(args: argparse.Namespace) -> None:
    """The ``robustse sweep`` command itself, in this process, on random timm weights from a file."""
    import timm
    import torch
    from safetensors.torch import save_file

    from robustse.cli import cli

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        weights = Path(tmp) / f"{args.model}.safetensors"
        save_file(timm.create_model(args.model, pretrained=False).state_dict(), str(weights))
        folder = split_folder(Path(tmp) / "folder", args.images + args.images // 2)
        argv = ["--quiet", "sweep", f"timm:{args.model}={weights}", "--dataset", f"imagefolder:{folder}",
                "--eval-subset", str(args.images), "--batch-size", str(args.batch_size),
                "--attack", f"pgd(steps={args.steps})", "--eps", f"0,{args.eps}",
                "--intervention", "held_gates", "--intervention", "frozen_mean",
                "--out", str(Path(tmp) / "run")]  # fmt: skip
        t0 = time.perf_counter()
        cli.main(argv, standalone_mode=False)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "images_per_s": args.images / seconds, "snapshot": 0}))


def child(args: argparse.Namespace) -> None:
    """One configuration: sweep, then print its measurements as JSON."""
    import torch

    import robustse as rs
    from robustse.data.folder import load_image_folder
    from robustse.experiment.sweep import SweepModel, build_attacks, run_sweep
    from robustse.probes.cell import snapshot, snapshot_bytes

    if args.child == "command":
        return command(args)
    rs.tune_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = rs.create_model(f"timm:{args.model}").eval()
        folder = image_folder(Path(tmp) / "val", args.images)
        ds = load_image_folder(f"imagefolder:{folder}", "test", model.preprocess).subset(None)
        attacks = build_attacks([{"name": "pgd", "steps": args.steps}], norm="linf", seed=0)
        t0 = time.perf_counter()
        rows = args.batch_size if args.child == "probes-whole-batch" else None
        run_sweep([SweepModel(args.model, model, "random weights")], attacks, [0.0, args.eps], ds, Path(tmp) / "run",
                  batch_size=args.batch_size, probes=args.child != "no-probes", progress=False,
                  pass_rows=rows)  # fmt: skip
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with torch.no_grad():
            one = snapshot_bytes(snapshot(model, ds.x[: args.batch_size].float() / 255))
    print(json.dumps({"peak": peak, "images_per_s": args.images / seconds, "snapshot": one}))


def run(mode: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--batch-size", str(args.batch_size),
           "--images", str(args.images), "--steps", str(args.steps), "--eps", str(args.eps)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


MODES = ("no-probes", "probes", "probes-whole-batch")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="seresnet50")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--eps", type=float, default=0.002)
    p.add_argument("--child", choices=[*MODES, "command"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    gib = 2**30
    print(f"timm:{args.model} at its input size, batch {args.batch_size}, {args.images} images, "
          f"PGD-{args.steps} + noise at eps 0 and {args.eps:g}, CPU")  # fmt: skip
    rows = {mode: run(mode, args) for mode in (*MODES, "command")}
    label = {"probes-whole-batch": f"probes, --pass-rows {args.batch_size}", "command": "sweep command (3 models)"}
    print(f"{'sweep':<24} {'peak RSS GiB':>12} {'images/s':>9} {'vs no probes':>13}")
    base = rows["no-probes"]
    for mode, r in rows.items():
        ratio = f"{r['peak'] / base['peak']:.2f}x RSS, {r['images_per_s'] / base['images_per_s']:.2f}x speed"
        print(f"{label.get(mode, mode):<24} {r['peak'] / gib:>12.2f} {r['images_per_s']:>9.2f}   {ratio}")
    print(f"one recorded clean pass of a {args.batch_size}-image batch: {rows['probes']['snapshot'] / gib:.2f} GiB")


if __name__ == "__main__":
    main()
