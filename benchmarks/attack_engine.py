"""Attack engine vs a torchattacks loop: same model, same test images, same batch size.

Each task is timed on both sides, A/B interleaved for several repeats (this machine is noisy),
evaluation passes included on both sides; medians and the speed-up ratio (torchattacks time /
robustse time, > 1 = robustse faster) are printed with the robust accuracies each side measured.

Tasks (8-epsilon Linf ladder):
  fgsm-ladder     FGSM at every eps                 robustse: one gradient reused for all eps
  pgd10-ladder    PGD-10 (no random start, step 2.5 eps/10) at every eps, all examples
  acc-only-ladder PGD-10 robust accuracy per eps    robustse: larger eps attack only survivors

    python benchmarks/attack_engine.py [--checkpoint CKPT] [--n 1000] [--batch-size 250] [--repeats 3]

Without --checkpoint it trains se_small_cnn for 2 epochs on Fashion-MNIST (about a minute).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchattacks

import robustse as rs
from robustse.attacks import create_attack
from robustse.attacks.evaluator import Evaluator
from robustse.core.config import TrainConfig
from robustse.data.base import to_float
from robustse.training.train import train_model

EPS = [0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12]


def batches(x: torch.Tensor, y: torch.Tensor, size: int):
    for i in range(0, len(x), size):
        yield x[i : i + size], y[i : i + size]


@torch.no_grad()
def correct(model: torch.nn.Module, adv: torch.Tensor, y: torch.Tensor) -> int:
    return int((model(adv).argmax(1) == y).sum())


def ours(task: str, model, x, y, bs: int) -> list[int]:
    """As a sweep does it: predictions through the engine's channels_last evaluator."""
    counts = [0] * len(EPS)
    ev = Evaluator(model)
    atk = create_attack("fgsm") if task == "fgsm-ladder" else create_attack("pgd", steps=10, random_start=False)
    for xb, yb in batches(x, y, bs):
        res = atk(model, xb, yb, epsilons=EPS, accuracy_only=task == "acc-only-ladder")
        if res.correct is not None:
            oks = [int(c.sum()) for c in res.correct]
        else:
            oks = [int((ev(adv).argmax(1) == yb).sum()) for adv in res.adversarials]
        counts = [c + o for c, o in zip(counts, oks, strict=True)]
    return counts


def theirs(task: str, model, x, y, bs: int) -> list[int]:
    counts = [0] * len(EPS)
    model.eval()
    for xb, yb in batches(x, y, bs):
        for i, eps in enumerate(EPS):
            if task == "fgsm-ladder":
                atk = torchattacks.FGSM(model, eps=eps)
            else:
                atk = torchattacks.PGD(model, eps=eps, alpha=eps * 0.25, steps=10, random_start=False)
            counts[i] += correct(model, atk(xb, yb), yb)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tasks", nargs="*", default=["fgsm-ladder", "pgd10-ladder", "acc-only-ladder"])
    args = p.parse_args()
    if args.checkpoint is None:
        out = Path(tempfile.mkdtemp()) / "se_small_cnn.safetensors"
        model = train_model("se_small_cnn", out=out, train=TrainConfig(epochs=2, augment=False), progress=False).model
    else:
        model, _ = rs.load_checkpoint(args.checkpoint)
    model.eval()
    ds = rs.load_dataset("fashion-mnist", split="test").subset(args.n, seed=0)
    x, y = to_float(ds.x), ds.y
    print(
        f"model {getattr(model, 'robustse_arch', '?')}, {len(x)} images, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats, eps ladder {EPS}"
    )
    print(
        f"{'task':<16} {'robustse s':>10} {'torchattacks s':>14} {'speed-up':>8}   robust acc (robustse | torchattacks)"
    )
    for task in args.tasks:
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        accs: dict[str, list[int]] = {}
        for _ in range(args.repeats):
            for side, fn in (("ours", ours), ("theirs", theirs)):
                t0 = time.perf_counter()
                accs[side] = fn(task, model, x, y, args.batch_size)
                times[side].append(time.perf_counter() - t0)
        a, b = statistics.median(times["ours"]), statistics.median(times["theirs"])
        fmt = " ".join(f"{c / len(x):.3f}" for c in accs["ours"])
        fmt_t = " ".join(f"{c / len(x):.3f}" for c in accs["theirs"])
        print(f"{task:<16} {a:>10.2f} {b:>14.2f} {b / a:>7.2f}x   {fmt} | {fmt_t}")


if __name__ == "__main__":
    main()
