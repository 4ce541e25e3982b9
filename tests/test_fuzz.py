"""Property-style test (issue 16): random malformed checkpoint metadata, sweep specs and attack
strings through the real CLI. Whatever the input: the exit code is 0 or 2, a failure is at most one
line on stderr with no traceback, and a failed command leaves the finished results.db unchanged.

The generator is seeded (the same cases on every run); each case's text is in its test id.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from robustse.cli import cli
from robustse.models.checkpoint import META_KEY

HOSTILE = [None, -1, 0, 2**64, -(2**63), 1.5, float("nan"), float("inf"), True, "", "x", "é\u0000", [], [1, 2],
           {"a": 1}, [[[[]]]], "9" * 400, 1e308]  # fmt: skip
META_KEYS = ["arch", "arch_kwargs", "arch_kwargs.num_classes", "arch_kwargs.in_channels", "arch_kwargs.mean",
             "arch_kwargs.reduction", "dataset", "seed", "gate_means", "gate_means.*", "train_examples",
             "weight_hash", "history", "clean_accuracy", "epochs", "foreign", "normalization"]  # fmt: skip
SWEEP_KEYS = ["epsilons", "attacks", "norm", "eval_subset", "batch_size", "accuracy_only", "probes",
              "probe_subsample", "interventions", "seed_batching", "pass_rows", "dataset", "channels_last",
              "seed"]  # fmt: skip
ATTACKS = {"fgsm": ["norm", "seed"], "pgd": ["steps", "rel_stepsize", "restarts", "random_start", "norm"],
           "noise": ["norm", "seed"], "gate": ["steps", "norm"], "torchattacks:PGD": ["steps", "alpha", "random_start"],
           "torchattacks:APGD": ["steps", "loss", "rho", "norm", "n_restarts"],
           "torchattacks:TIFGSM": ["kernel_name", "len_kernel", "steps"],
           "torchattacks:FAB": ["steps", "eta"]}  # fmt: skip
TOML_VALUES = ["-1", "0", "1.5", "nan", "inf", "'x'", "[]", "[0, 'a']", "{}", "true", "1e308", "[0.0, 1e308]",
               "[{name = 'nope'}]", "[{name = 'pgd', steps = 0}]", "['held_gates', 'x']",
               "'imagefolder:/nowhere'"]  # fmt: skip


def _set(meta: dict, dotted: str, value: object) -> None:  # type: ignore[type-arg]
    *path, last = dotted.split(".")
    node = meta
    for key in path:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if last == "*":
        last = next(iter(node), "x")
    node[last] = value


def _meta_cases(n: int) -> list[tuple[str, object]]:
    rng = random.Random(1616)
    cases = [(rng.choice(META_KEYS), rng.choice(HOSTILE)) for _ in range(n)]
    return cases + [("deep", None)]


def _spec_cases(n: int) -> list[str]:
    rng = random.Random(1617)
    drawn = [f"{rng.choice(SWEEP_KEYS)} = {rng.choice(TOML_VALUES)}" for _ in range(n)]
    depth, size = rng.randint(2_000, 60_000), rng.randint(1_001, 200_000)  # nested and oversized (issue 25)
    nested = [f"{key} = {'[' * depth}{']' * depth}" for key in ("epsilons", "attacks", "interventions")]
    oversized = [f"epsilons = [{', '.join(['0.01'] * size)}]", f"dataset = '{'x' * size}'"]
    return drawn + nested + oversized


def _attack_cases(n: int) -> list[str]:
    rng = random.Random(1618)
    values = ["0", "-1", "1.5", "nan", "x", "true", "2", "1e308", "linf", "l2", "L3", ""]
    out = []
    for _ in range(n):
        name = rng.choice(sorted(ATTACKS))
        opts = [f"{rng.choice([*ATTACKS[name], 'bogus'])}={rng.choice(values)}" for _ in range(rng.randint(1, 2))]
        out.append(f"{name}({','.join(opts)})")
    return out


@pytest.fixture(scope="module")
def finished(trained_small, tmp_path_factory):
    """A run directory with a finished sweep: what every failed command must leave untouched."""
    _, _, _, ckpt = trained_small
    run = tmp_path_factory.mktemp("fuzz") / "run"
    res = _cli("--quiet", "sweep", str(ckpt), "--attack", "fgsm", "--eps", "0,0.02", "--eval-subset", "16",
               "--out", str(run))  # fmt: skip
    assert res.exit_code == 0, res.output
    return ckpt, run


def _cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args), catch_exceptions=True)


def _digest(run: Path) -> str:
    return hashlib.sha256((run / "results.db").read_bytes()).hexdigest()


def _check(res, run: Path, before: str) -> None:  # type: ignore[no-untyped-def]
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code in (0, 2), res.output
    assert "Traceback" not in res.output
    if res.exit_code != 0:
        assert len(res.output.strip().splitlines()) <= 1, res.output
        assert _digest(run) == before


def _write_meta(src: Path, dst: Path, key: str, value: object) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as fh:
        meta = json.loads(fh.metadata()[META_KEY])
    if key == "deep":
        text = "[" * 200_000 + "]" * 200_000  # JSON nested 200,000 deep
    else:
        _set(meta, key, value)
        text = json.dumps(meta)
    save_file(load_file(str(src)), str(dst), metadata={META_KEY: text})


@pytest.mark.parametrize(("key", "value"), _meta_cases(40), ids=lambda v: repr(v)[:30])
def test_malformed_checkpoint_metadata(finished, tmp_path, key, value):
    ckpt, run = finished
    bad = tmp_path / "bad.safetensors"
    _write_meta(ckpt, bad, key, value)
    before = _digest(run)
    for args in (["sweep", str(bad), "--attack", "fgsm", "--eps", "0,0.02", "--eval-subset", "16", "--out", str(run)],
                 ["eval", str(bad), "--eval-subset", "16"], ["inspect", str(bad), "--json"]):  # fmt: skip
        _check(_cli("--quiet", *args), run, before)


@pytest.mark.parametrize("line", _spec_cases(30), ids=lambda line: line[:40])
def test_malformed_sweep_specs(finished, tmp_path, line):
    ckpt, run = finished
    spec = tmp_path / "s.toml"
    spec.write_text(f"[sweep]\neval_subset = 16\nattacks = [{{ name = 'fgsm' }}]\nepsilons = [0, 0.02]\n{line}\n")
    before = _digest(run)
    _check(_cli("--quiet", "sweep", str(ckpt), "--spec", str(spec), "--out", str(run)), run, before)


@pytest.mark.parametrize("text", _attack_cases(30))
def test_malformed_attack_strings(finished, text):
    ckpt, run = finished
    before = _digest(run)
    shutil.rmtree(run.parent / "scratch", ignore_errors=True)
    _check(_cli("--quiet", "sweep", str(ckpt), "--attack", text, "--eps", "0,0.02", "--eval-subset", "8", "--out",
                str(run)), run, before)  # fmt: skip


NAME_PIECES = ["<img src=x onerror=alert(1)>", "\n# heading\n", "\t", "|", "`", "*", "[a](b)", "\x1b[31m", "é",
               "&amp;", "_", "\\", "\r", "<!--"]  # fmt: skip


def _name_cases(n: int) -> list[str]:
    rng = random.Random(1619)
    return ["".join(rng.choice(NAME_PIECES) for _ in range(rng.randint(1, 4))) for _ in range(n)]


@pytest.mark.parametrize("name", [*_name_cases(6), "\x1b[31mred\r"], ids=lambda v: repr(v)[:30])
def test_names_with_markup_and_control_characters(finished, tmp_path, name):
    """A checkpoint named with markup or control characters: the sweep and report succeed or refuse
    in one line, and report.md carries no raw tag, heading or line break from the name."""
    ckpt, _ = finished
    hostile = tmp_path / f"{name}_s0.safetensors"
    shutil.copy(ckpt, hostile)
    run = tmp_path / "run"
    res = _cli("--quiet", "sweep", str(hostile), "--attack", "fgsm", "--attack", "noise", "--eps", "0,0.02",
               "--eval-subset", "16", "--out", str(run))  # fmt: skip
    assert res.exit_code in (0, 2) and "Traceback" not in res.output, res.output
    if res.exit_code:
        return
    res = _cli("--quiet", "report", str(run), "--bootstrap", "100")
    assert res.exit_code == 0, res.output
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "<img" not in md and "<!--" not in md and "\x1b" not in md and "\r" not in md
    assert not any(line.startswith("# heading") for line in md.splitlines())
