"""torch.compile vs eager on one machine: training steps and attack calls, side by side.

For each architecture the same SGD steps (batch 128, random Fashion-MNIST-shaped inputs) run
through the eager model and through ``torch.compile`` of an identical copy, interleaved for
``--repeats`` repeats (``[train] compile``); then robustse's FGSM ladder and PGD-10 at one eps
(the user's entry point, ``create_attack(...)(model, x, y, epsilons=...)``) in eval mode, through
the attacks' eval-mode copy eager and with its forward compiled, as ``[sweep] compile = on`` runs
them (``reusing_copies(compiled=True)``). Prints medians, the compiled/eager speed ratio (> 1 =
compiled faster), the one-off warm-up and how far compiled results are from eager ones (loss and
gradients of the first step; robust accuracy of the attacks). These are the measurements the
``auto`` rules (:mod:`robustse.training.compiled`, :mod:`robustse.attacks.compiled`) rest on.

    python benchmarks/compile_speed.py [--archs small_cnn se_small_cnn static_small_cnn] [--steps 20]
        [--repeats 5] [--device cpu] [--channels-last] [--no-attacks]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from train_throughput import images_per_second  # the calibration's own step loop (same folder)

import robustse as rs
from robustse.attacks import create_attack
from robustse.core.device import resolve_device
from robustse.models.eval_copy import reusing_copies

EPS = [0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12]


def first_step_gap(eager: torch.nn.Module, compiled: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(|loss difference|, largest |gradient difference|) of one step from identical weights."""
    grads = []
    for m in (eager, compiled):
        m.train()
        m.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        params = m._orig_mod.parameters() if hasattr(m, "_orig_mod") else m.parameters()
        grads.append((float(loss.detach()), [p.grad.detach().clone() for p in params]))
    (la, ga), (lb, gb) = grads
    return abs(la - lb), max(float((a - b).abs().max()) for a, b in zip(ga, gb, strict=True))


def attack_time(model: torch.nn.Module, attack, x: torch.Tensor, y: torch.Tensor, eps: list[float], *,
                compiled: bool = False):  # fmt: skip
    """(seconds, robust accuracy per eps) of one attack call, through the eval-mode copy a sweep
    uses: eager, or with its forward compiled (``[sweep] compile = on``)."""
    t0 = time.perf_counter()
    with reusing_copies(compiled=compiled):
        result = attack(model, x, y, epsilons=eps)
    if x.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        accs = [float((model(a).argmax(1) == y).float().mean()) for a in result.adversarials]
    return seconds, accs


def median_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Medians of ``fn_a()`` and ``fn_b()`` run interleaved ``repeats`` times."""
    a, b = [], []
    for _ in range(repeats):
        a.append(fn_a())
        b.append(fn_b())
    return statistics.median(a), statistics.median(b)


def bench_training(arch: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:
    torch.manual_seed(0)
    eager = rs.create_model(arch).to(x.device)
    if args.channels_last:  # as [train] channels_last = auto trains on a CPU
        eager = eager.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(copy.deepcopy(eager))
    t0 = time.perf_counter()
    loss_gap, grad_gap = first_step_gap(eager, compiled, x, y)  # the compiled graphs are built here
    warm = time.perf_counter() - t0
    images_per_second(compiled, x, y, 2)
    images_per_second(eager, x, y, 2)
    e, c = median_pair(
        lambda: images_per_second(eager, x, y, args.steps),
        lambda: images_per_second(compiled, x, y, args.steps),
        args.repeats,
    )
    print(f"train  {arch:<18} {e:>9.0f} {c:>9.0f} img/s {c / e:>6.2f}x  warm-up {warm:5.1f} s  "
          f"|dloss| {loss_gap:.1e} |dgrad| {grad_gap:.1e}")  # fmt: skip


def bench_attacks(arch: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = rs.create_model(arch).to(x.device).eval()
    for name, atk, eps in (("fgsm", create_attack("fgsm"), EPS), ("pgd10", create_attack("pgd", steps=10), [0.03])):
        t0 = time.perf_counter()
        attack_time(model, atk, x, y, eps, compiled=True)  # the compiled graphs are built here
        warm = time.perf_counter() - t0
        (_, ae), (_, ac) = attack_time(model, atk, x, y, eps), attack_time(model, atk, x, y, eps, compiled=True)
        te, tc = median_pair(
            lambda a=atk, e=eps: attack_time(model, a, x, y, e)[0],
            lambda a=atk, e=eps: attack_time(model, a, x, y, e, compiled=True)[0],
            args.repeats,
        )
        gap = max(abs(p - q) for p, q in zip(ae, ac, strict=True))
        print(f"attack {arch:<18} {name:<6} {te:>7.3f} s {tc:>7.3f} s {te / tc:>6.2f}x  warm-up {warm:5.1f} s  "
              f"|d robust acc| {gap:.4f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="*", default=["small_cnn", "se_small_cnn", "static_small_cnn"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--attack-batch", type=int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true",
                   help="training rows: both sides in channels_last layout (the CPU's training default)")  # fmt: skip
    p.add_argument("--no-attacks", action="store_true", help="training rows only")
    args = p.parse_args()
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(128, 1, 28, 28, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    xa = torch.rand(args.attack_batch, 1, 28, 28, generator=gen)
    ya = torch.randint(0, 10, (args.attack_batch,), generator=gen)
    x, y, xa, ya = (t.to(device) for t in (x, y, xa, ya))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    layout = "channels_last" if args.channels_last else "default layout"
    print(f"torch {torch.__version__}, {name}; eager vs compiled (inductor); training in the {layout}")
    print(f"{'':6} {'arch':<18} {'eager':>9} {'compiled':>9}")
    for arch in args.archs:
        bench_training(arch, args, x, y)
    for arch in [] if args.no_attacks else args.archs:
        bench_attacks(arch, args, xa, ya)


if __name__ == "__main__":
    main()
