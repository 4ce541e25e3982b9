"""PGD-10 sweep throughput vs a torchattacks loop: same model, same images, same eps ladder.

robustse side: ``run_sweep`` exactly as the CLI runs it (clean pass, every cell committed to a
fresh SQLite store, sanity checks, CSV export), probes off — the same work as the loop — and,
as a separate line, probes on (which measures much more per cell). torchattacks side: for every
batch and eps, ``torchattacks.PGD`` (random start, 10 steps, step 2.5·eps/10) and a prediction
pass, plus one clean prediction pass. A/B interleaved repeats; medians; images·eps per second.

Two comparisons: both sides at the same batch size, and each side at its own best batch size
(chosen from --sizes by one timed run each, then measured with the repeats).

At the same batch size it also times ``run_sweep(channels_last=True)`` and, to show where that
speed comes from, the torchattacks loop on a channels_last copy of the model: every ratio is
against the torchattacks loop on the model as given.

    python benchmarks/sweep_throughput.py [--checkpoint CKPT] [--n 500] [--batch-size 256] [--repeats 3]

Without --checkpoint it uses reports/quick/models/se_small_cnn_s0.safetensors if present, else
trains se_small_cnn for one epoch on Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchattacks

import robustse as rs
from robustse.attacks import create_attack
from robustse.core.config import TrainConfig
from robustse.data.base import to_float
from robustse.experiment.sweep import SweepModel, run_sweep
from robustse.training.train import train_model

EPS = [0.01, 0.02, 0.03, 0.05, 0.1]


def ours(model, ds, bs: int, *, probes: bool, channels_last: bool = False) -> float:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_sweep(
            [SweepModel("m", model, "-")],
            [create_attack("pgd", steps=10, seed=0)],
            [0.0, *EPS],
            ds,
            Path(tmp),
            batch_size=bs,
            probes=probes,
            progress=False,
            channels_last=channels_last,
        )
        return time.perf_counter() - t0


def theirs(model, ds, bs: int, *, layout: torch.nn.Module | None = None) -> float:  # type: ignore[no-untyped-def]
    """The loop on ``model``, or on ``layout`` (the same model in another memory layout) if given."""
    model = model if layout is None else layout
    t0 = time.perf_counter()
    x, y = to_float(ds.x), ds.y
    model.eval()
    correct = [0] * (len(EPS) + 1)
    for i in range(0, len(x), bs):
        xb, yb = x[i : i + bs], y[i : i + bs]
        with torch.no_grad():
            correct[0] += int((model(xb).argmax(1) == yb).sum())
        for k, eps in enumerate(EPS, start=1):
            adv = torchattacks.PGD(model, eps=eps, alpha=eps * 0.25, steps=10, random_start=True)(xb, yb)
            with torch.no_grad():
                correct[k] += int((model(adv).argmax(1) == yb).sum())
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--sizes", type=int, nargs="*", default=[64, 128, 256, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    rs.tune_allocator()  # as the CLI does
    device = torch.device(args.device)
    quick = Path("reports/quick/models/se_small_cnn_s0.safetensors")
    ckpt = args.checkpoint or (quick if quick.exists() else None)
    if ckpt is None:
        out = Path(tempfile.mkdtemp()) / "se_small_cnn.safetensors"
        model = train_model("se_small_cnn", out=out, train=TrainConfig(epochs=1, augment=False), progress=False).model
    else:
        model, _ = rs.load_checkpoint(ckpt)
    model = model.to(device).eval()
    ds = rs.load_dataset("fashion-mnist", split="test").subset(args.n, seed=0)
    work = len(ds) * len(EPS)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {getattr(model, 'robustse_arch', '?')}, {len(ds)} images x {len(EPS)} eps, PGD-10, {name}")

    def measure(runs: dict[str, tuple]) -> dict[str, float]:  # type: ignore[type-arg]
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for key, (fn, kw) in runs.items():
                times[key].append(fn(model, ds, **kw))
        return {k: statistics.median(v) for k, v in times.items()}

    # warm-up (allocator, lazy imports)
    ours(model, ds.subset(32), 32, probes=False), theirs(model, ds.subset(32), 32)
    bs = args.batch_size
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    same = measure(
        {
            "robustse": (ours, {"bs": bs, "probes": False}),
            "torchattacks": (theirs, {"bs": bs}),
            "robustse+probes": (ours, {"bs": bs, "probes": True}),
            "robustse+cl": (ours, {"bs": bs, "probes": False, "channels_last": True}),
            "torchattacks+cl": (theirs, {"bs": bs, "layout": cl}),
        }
    )
    print(f"\nsame batch size ({bs}), medians of {args.repeats}:")
    print(f"{'side':<18} {'seconds':>8} {'img·eps/s':>10} {'vs torchattacks':>16}   (+cl: channels_last)")
    for key, t in same.items():
        print(f"{key:<18} {t:>8.2f} {work / t:>10.1f} {same['torchattacks'] / t:>15.2f}x")

    scan_ours = {s: ours(model, ds, s, probes=False) for s in args.sizes}
    scan_theirs = {s: theirs(model, ds, s) for s in args.sizes}
    b_ours, b_theirs = min(scan_ours, key=scan_ours.get), min(scan_theirs, key=scan_theirs.get)  # type: ignore[arg-type]
    print("\nbatch-size scan (one run each, s):")
    print("  robustse     " + ", ".join(f"{s}: {t:.2f}" for s, t in scan_ours.items()))
    print("  torchattacks " + ", ".join(f"{s}: {t:.2f}" for s, t in scan_theirs.items()))
    best = measure({"robustse": (ours, {"bs": b_ours, "probes": False}), "torchattacks": (theirs, {"bs": b_theirs})})
    print(f"\neach at its best batch size (robustse {b_ours}, torchattacks {b_theirs}), medians of {args.repeats}:")
    for key, t in best.items():
        print(f"{key:<18} {t:>8.2f} {work / t:>10.1f} {best['torchattacks'] / t:>15.2f}x")


if __name__ == "__main__":
    main()
