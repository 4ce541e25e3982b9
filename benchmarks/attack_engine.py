"""Attack engine vs its peers: same model, same test images, same batch size, same steps.

robustse is called from the user's entry point, ``create_attack(...)(model, x, y, epsilons=...)``,
in its default path (gradients through the eval-mode copy) and with ``exact=True`` (the model
itself); the peers are a torchattacks loop and, where installed, Foolbox 3 and ART (pip install
robustse[bench]). Every side pays one evaluation pass per eps, through the model itself. Each task
is timed on every side, interleaved for ``--repeats`` repeats (this machine is noisy); medians,
the speed-up of robustse's default path over each other side (their time / robustse's, > 1 =
robustse faster) and every side's robust accuracy per eps are printed.

Tasks (8-epsilon Linf ladder, 0.002-0.12):
  fgsm-ladder     FGSM at every eps                 robustse: one gradient reused for all eps
  pgd10-ladder    PGD-10 (no random start, step 2.5 eps/10) at every eps, all examples
  acc-only-ladder PGD-10 robust accuracy per eps    robustse: larger eps attack only survivors
                                                    (the peers: their full PGD-10 ladder)

    python benchmarks/attack_engine.py [--checkpoint CKPT] [--n 1000] [--batch-size 250] [--repeats 3]
        [--sides robustse exact torchattacks foolbox art]

Without --checkpoint it trains se_small_cnn for 2 epochs on Fashion-MNIST (about a minute).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchattacks

import robustse as rs
from robustse.attacks import create_attack
from robustse.core.config import TrainConfig
from robustse.data.base import to_float
from robustse.training.train import train_model

EPS = [0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12]
STEPS, REL_STEP = 10, 0.25  # PGD-10 with robustse's default step, 2.5 eps / steps


def batches(x: torch.Tensor, y: torch.Tensor, size: int):
    for i in range(0, len(x), size):
        yield x[i : i + size], y[i : i + size]


@torch.no_grad()
def correct(model: torch.nn.Module, adv: torch.Tensor, y: torch.Tensor) -> int:
    return int((model(adv).argmax(1) == y).sum())


def robustse_side(exact: bool) -> Callable[..., list[int]]:
    def run(task: str, model, x, y, bs: int) -> list[int]:
        counts = [0] * len(EPS)
        if task == "fgsm-ladder":
            atk = create_attack("fgsm", exact=exact)
        else:
            atk = create_attack("pgd", steps=STEPS, random_start=False, exact=exact)
        for xb, yb in batches(x, y, bs):
            res = atk(model, xb, yb, epsilons=EPS, accuracy_only=task == "acc-only-ladder")
            if res.correct is not None:  # accuracy-only: the engine's own last pass decided it
                oks = [int(c.sum()) for c in res.correct]
            else:
                oks = [correct(model, adv, yb) for adv in res.adversarials]
            counts = [c + o for c, o in zip(counts, oks, strict=True)]
        return counts

    return run


def torchattacks_side(task: str, model, x, y, bs: int) -> list[int]:
    counts = [0] * len(EPS)
    for xb, yb in batches(x, y, bs):
        for i, eps in enumerate(EPS):
            if task == "fgsm-ladder":
                atk = torchattacks.FGSM(model, eps=eps)
            else:
                atk = torchattacks.PGD(model, eps=eps, alpha=eps * REL_STEP, steps=STEPS, random_start=False)
            counts[i] += correct(model, atk(xb, yb), yb)
    return counts


def foolbox_side(task: str, model, x, y, bs: int) -> list[int]:
    import foolbox as fb

    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    if task == "fgsm-ladder":
        attack = fb.attacks.FGSM()
    else:
        attack = fb.attacks.LinfPGD(steps=STEPS, rel_stepsize=REL_STEP, random_start=False)
    counts = [0] * len(EPS)
    for xb, yb in batches(x, y, bs):
        _, _, success = attack(fmodel, xb, yb, epsilons=EPS)  # its own evaluation pass per eps
        counts = [c + int((~s).sum()) for c, s in zip(counts, success, strict=True)]
    return counts


def art_side(task: str, model, x, y, bs: int) -> list[int]:
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")  # fmt: skip
    xs, ys = x.numpy(), y.numpy()
    counts = []
    for eps in EPS:
        if task == "fgsm-ladder":
            attack = FastGradientMethod(clf, norm=np.inf, eps=eps, batch_size=bs)
        else:
            attack = ProjectedGradientDescentPyTorch(clf, norm=np.inf, eps=eps, eps_step=eps * REL_STEP,
                                                     max_iter=STEPS, num_random_init=0, batch_size=bs,
                                                     verbose=False)  # fmt: skip
        adv = torch.from_numpy(attack.generate(xs, y=ys))
        counts.append(sum(correct(model, a, b) for a, b in batches(adv, y, bs)))
    return counts


SIDES: dict[str, Callable[..., list[int]]] = {
    "robustse": robustse_side(exact=False),
    "exact": robustse_side(exact=True),
    "torchattacks": torchattacks_side,
    "foolbox": foolbox_side,
    "art": art_side,
}
NEEDS = {"foolbox": "foolbox", "art": "art"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tasks", nargs="*", default=["fgsm-ladder", "pgd10-ladder", "acc-only-ladder"])
    p.add_argument("--sides", nargs="*", default=list(SIDES))
    args = p.parse_args()
    sides = [s for s in args.sides if s not in NEEDS or importlib.util.find_spec(NEEDS[s]) is not None]
    missing = sorted(set(args.sides) - set(sides))
    if args.checkpoint is None:
        out = Path(tempfile.mkdtemp()) / "se_small_cnn.safetensors"
        model = train_model("se_small_cnn", out=out, train=TrainConfig(epochs=2, augment=False), progress=False).model
    else:
        model, _ = rs.load_checkpoint(args.checkpoint)
    model.eval()
    ds = rs.load_dataset("fashion-mnist", split="test").subset(args.n, seed=0)
    x, y = to_float(ds.x), ds.y
    print(f"model {getattr(model, 'robustse_arch', '?')}, {len(x)} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats, eps ladder {EPS}"
          + (f"; not installed: {', '.join(missing)}" if missing else ""))  # fmt: skip
    print(f"{'task':<16}" + "".join(f"{s + ' s':>15}" for s in sides) + "   speed-up of robustse over each")
    for task in args.tasks:
        times: dict[str, list[float]] = {s: [] for s in sides}
        accs: dict[str, list[int]] = {}
        for r in range(args.repeats):
            for side in sides if r % 2 == 0 else sides[::-1]:
                t0 = time.perf_counter()
                accs[side] = SIDES[side](task, model, x, y, args.batch_size)
                times[side].append(time.perf_counter() - t0)
        med = {s: statistics.median(t) for s, t in times.items()}
        ours = med.get("robustse")
        ups = "  ".join(f"{s} {med[s] / ours:.2f}x" for s in sides if s != "robustse") if ours else ""
        print(f"{task:<16}" + "".join(f"{med[s]:>15.2f}" for s in sides) + f"   {ups}")
        for side in sides:
            print(f"{'':<18}robust acc {side:<13} " + " ".join(f"{c / len(x):.3f}" for c in accs[side]))


if __name__ == "__main__":
    main()
