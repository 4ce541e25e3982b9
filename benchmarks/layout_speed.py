"""The default fast paths vs the plain ones, side by side: training in channels_last layout vs the
default layout, and the attacks' input-gradient pass through the eval-mode copy vs the model.

For each architecture: SGD steps (batch 128, random Fashion-MNIST-shaped inputs) on the model in
the default layout and on an identical copy in channels_last (what ``[train] channels_last``
does), interleaved for ``--repeats`` repeats; then one input-gradient pass of the attacks' loss
(batch 250, real Fashion-MNIST test images, a model with settled batch-norm statistics) through
the model itself (``exact=True``) and through :func:`robustse.models.eval_copy.eval_copy` with and
without channels_last weights (the default on a CPU, and what a model with hooks gets). Prints
medians and the speed-ups (> 1 = the fast path is faster).

    python benchmarks/layout_speed.py [--archs small_cnn se_small_cnn static_small_cnn] [--steps 20]
        [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from train_throughput import images_per_second  # the calibration's own step loop (same folder)

import robustse as rs
from robustse.attacks.base import input_grad
from robustse.core.device import resolve_device
from robustse.data.base import to_float
from robustse.models.eval_copy import eval_copy


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median of each ``fns[k]()`` over ``repeats`` rounds, the order reversed every other round."""
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            runs[k].append(fns[k]())
    return {k: statistics.median(v) for k, v in runs.items()}


def seconds(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_training(arch: str, args, x: torch.Tensor, y: torch.Tensor) -> None:
    torch.manual_seed(0)
    plain = rs.create_model(arch).to(x.device)
    cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    for m in (plain, cl):
        images_per_second(m, x, y, 2)  # warm-up
    med = interleaved({"default": lambda: images_per_second(plain, x, y, args.steps),
                       "channels_last": lambda: images_per_second(cl, x, y, args.steps)}, args.repeats)  # fmt: skip
    a, b = med["default"], med["channels_last"]
    print(f"train     {arch:<18} default {a:>7.0f} img/s   channels_last {b:>7.0f} img/s   {b / a:5.2f}x")


def settle(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Batch-norm statistics from a few training-mode passes over ``x``: as a trained model has."""
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 50):
            model(x[i : i + 50])
    return model.eval()


def bench_gradients(arch: str, args, x: torch.Tensor, y: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = settle(rs.create_model(arch).to(x.device), x)
    for p in model.parameters():
        p.requires_grad_(False)
    views = {"model": model, "copy": eval_copy(model), "copy_cl": eval_copy(model, channels_last=True)}
    for m in views.values():
        input_grad(m, x, y, len(x))  # warm-up
    med = interleaved({k: (lambda m=m: seconds(lambda: input_grad(m, x, y, len(x)), x.device))
                       for k, m in views.items()}, args.repeats)  # fmt: skip
    base = med["model"]
    print(f"gradient  {arch:<18} model {base * 1e3:6.1f} ms   eval copy {med['copy'] * 1e3:6.1f} ms "
          f"({base / med['copy']:.2f}x)   eval copy, channels_last {med['copy_cl'] * 1e3:6.1f} ms "
          f"({base / med['copy_cl']:.2f}x)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="*", default=["small_cnn", "se_small_cnn", "static_small_cnn"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(128, 1, 28, 28, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    test = rs.load_dataset("fashion-mnist", split="test").subset(250, seed=0)
    xa, ya = to_float(test.x), test.y
    x, y, xa, ya = (t.to(device) for t in (x, y, xa, ya))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}; {args.repeats} interleaved repeats, medians")
    for arch in args.archs:
        bench_training(arch, args, x, y)
    for arch in args.archs:
        bench_gradients(arch, args, xa, ya)


if __name__ == "__main__":
    main()
