"""The quick experiment's phase timings, before and after a change: an older commit vs this tree.

Checks out ``--before`` (a git ref) into a temporary worktree, then runs
``robustse experiment --spec attacks/quick.toml`` from scratch (training included) with that
code and with this working tree, alternating, ``--repeats`` times each, in fresh output folders;
prints each run's phase timings from its ``manifest.json`` and the medians.

``--seeds K`` runs the spec with its first K seeds only (each seed trains and sweeps the same
models, so the phase ratios carry over): shorter runs, so more alternating repeats fit, which a
machine whose speed drifts during a run needs.

    python benchmarks/quick_phases.py --before 523a079 [--repeats 1] [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("data", "train", "sweep", "report")


# Runs robustse.cli from the folder CODE, bypassing an editable install's import hook (which would
# otherwise import the working tree's robustse whatever sys.path says).
BOOT = """import runpy, sys
code = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, code)
import robustse
assert robustse.__file__.startswith(code), robustse.__file__
sys.argv[0] = "robustse"
runpy.run_module("robustse.cli", run_name="__main__")
"""


def run(code: Path, out: Path, spec: Path) -> dict[str, float]:
    cmd = [sys.executable, "-c", BOOT, str(code), "--quiet", "experiment", "--spec", str(spec), "--out", str(out)]
    subprocess.run(cmd, cwd=code, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": ""})
    return json.loads((out / "manifest.json").read_text())["timings_seconds"]


def quick_spec(tmp: Path, seeds: int | None) -> Path:
    """attacks/quick.toml, or a copy of it with only its first ``seeds`` seeds."""
    import tomllib

    spec = ROOT / "attacks" / "quick.toml"
    if seeds is None:
        return spec
    text = spec.read_text()
    kept = tomllib.loads(text)["seeds"][:seeds]
    lines = [f"seeds = {kept}" if line.startswith("seeds =") else line for line in text.splitlines()]
    (tmp / "quick.toml").write_text("\n".join(lines) + "\n")
    return tmp / "quick.toml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git ref of the code before the change")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seeds", type=int, default=None, help="run only the spec's first K seeds")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = quick_spec(Path(tmp), args.seeds)
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.before], check=True,
                       capture_output=True)  # fmt: skip
        try:
            times: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for r in range(args.repeats):
                for label, code in (("before", old), ("after", ROOT)):
                    t = run(code, Path(tmp) / f"{label}{r}", spec)
                    times[label].append(t)
                    line = ", ".join(f"{k} {t.get(k, 0):.1f}s" for k in PHASES)
                    print(f"{label:<7} run {r + 1}: {line}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    print(f"\nmedians over {args.repeats} run(s) each ({args.before} vs working tree):")
    for k in PHASES:
        b = statistics.median(t.get(k, 0.0) for t in times["before"])
        a = statistics.median(t.get(k, 0.0) for t in times["after"])
        print(f"  {k:<7} before {b:7.1f}s  after {a:7.1f}s  ({b / a if a else float('nan'):.2f}x)")


if __name__ == "__main__":
    main()
