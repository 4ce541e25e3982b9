"""Cost of recording gates and block outputs: forward passes with and without ``capture``.

Interleaved repeats (plain forward, captured forward, ...) on the same model and batch; prints
median times and the overhead (captured / plain − 1). The issue's goal: at most 5%.

    python benchmarks/capture_overhead.py [--batch-size 256] [--repeats 15] [--passes 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import robustse as rs


def timed(fn, passes: int) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for _ in range(passes):
        fn()
    return (time.perf_counter() - t0) / passes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--models", nargs="*", default=["se_small_cnn", "se_cnn", "se_resnet20", "resnet20"])
    p.add_argument("--default-malloc", action="store_true", help="Skip the allocator tuning the CLI applies.")
    args = p.parse_args()
    tuned = False if args.default_malloc else rs.tune_allocator()
    x = torch.rand(args.batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    print(
        f"batch {args.batch_size}, {args.passes} passes x {args.repeats} interleaved repeats, "
        f"{torch.get_num_threads()} threads, CPU, allocator {'tuned as the CLI' if tuned else 'default'}"
    )
    print(f"{'model':<14} {'plain ms':>9} {'captured ms':>12} {'overhead':>9}")
    for name in args.models:
        torch.manual_seed(0)
        model = rs.create_model(name).eval()

        def plain(model: torch.nn.Module = model) -> None:
            with torch.no_grad():
                model(x)

        def captured(model: torch.nn.Module = model) -> None:
            with torch.no_grad(), rs.capture(model):
                model(x)

        plain()  # warm-up
        captured()
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(plain, args.passes))
            b.append(timed(captured, args.passes))
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{name:<14} {ma * 1e3:>9.2f} {mb * 1e3:>12.2f} {mb / ma - 1:>+8.1%}")


if __name__ == "__main__":
    main()
