"""Hostile inputs (README "Reliability"): a rejected command never loses or changes results, every
option is honoured or refused, and a cell's randomness depends only on what the cell is."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import robustse as rs
from robustse.cli import cli


def _cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _cells(run: Path) -> list[tuple]:  # type: ignore[type-arg]
    """Every stored cell and the number of per-example rows: what a rejected command must leave alone."""
    with sqlite3.connect(run / "results.db") as conn:
        cells = conn.execute("SELECT model, attack_key, eps, correct, status FROM cells ORDER BY 1, 2, 3").fetchall()
        (rows,) = conn.execute("SELECT COUNT(*) FROM examples").fetchone()
    return [*cells, rows]


def _assert_refused(res, needle: str) -> None:  # type: ignore[no-untyped-def]
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_changed_weights_keep_their_cells_until_a_command_is_accepted(trained_small, tmp_path):
    """Item 1: the same file name with new weights used to drop the finished cells before a later
    check refused the command."""
    _, _, _, ckpt = trained_small
    model = tmp_path / "m.safetensors"
    shutil.copy(ckpt, model)
    run = tmp_path / "run"
    base = ["--quiet", "sweep", str(model), "--eval-subset", "40", "--out", str(run)]
    assert _cli(*base, "--attack", "fgsm", "--attack", "pgd(steps=2)", "--eps", "0,0.05").exit_code == 0
    before = _cells(run)
    torch.manual_seed(123)
    rs.save_checkpoint(rs.create_model("se_small_cnn"), model)  # retrained under the same name
    _assert_refused(_cli(*base, "--attack", "fgsm", "--eps", "0,nan"), "nan")
    refused = _cli(*base, "--attack", "torchattacks:PGD(steps=1.5)", "--eps", "0,0.05")
    _assert_refused(refused, "steps must be an integer")
    assert _cells(run) == before
    res = _cli(*base, "--attack", "fgsm", "--attack", "pgd(steps=2)", "--eps", "0,0.05")  # accepted: replaced
    assert res.exit_code == 0, res.output
    after = _cells(run)
    assert len(after) == len(before) and after != before


def test_apgd_takes_the_sweeps_norm_and_seed(trained_small):
    """Item 3: APGD(norm=l2) used to run APGD's default Linf attack, and norm=L2 was refused."""
    model, x, y, _ = trained_small
    for norm in ("l2", "L2"):
        atk = rs.create_attack("torchattacks:APGD", norm=norm, steps=3)
        assert atk.norm == "l2"
        delta = (atk(model, x[:16], y[:16], epsilons=[0.5]).adversarials[0] - x[:16]).flatten(1)
        assert float(delta.norm(dim=1).max()) <= 0.5 + 1e-4
        assert float(delta.abs().amax()) < 0.5  # an Linf attack at 0.5 would move pixels by 0.5
    a1 = rs.create_attack("torchattacks:APGD", steps=2, seed=1)
    a2 = rs.create_attack("torchattacks:APGD", steps=2, seed=2)
    assert a1.describe() != a2.describe() and a1._shared["seed"] == 1  # the seed reaches APGD's own


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("torchattacks:PGD(steps=1.5)", "option steps must be an integer (default 10), got 1.5"),
        ("torchattacks:APGD(verbose=yes)", "option verbose must be true or false"),
        ("torchattacks:FAB(eta=nan)", "option eta must be a finite number"),
    ],
)
def test_torchattacks_options_of_the_wrong_type_are_refused_up_front(text, needle):
    from robustse.cli import parse_attack
    from robustse.errors import AttackError

    with pytest.raises(AttackError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        spec = parse_attack(text)
        rs.create_attack(spec.pop("name"), **spec)


def test_a_cells_random_starts_do_not_depend_on_the_rest_of_the_ladder(trained_small, tmp_path):
    """Item 4: growing a ladder on rerun gave different PGD/noise results at the same eps than a
    fresh run of the final command."""
    _, _, _, ckpt = trained_small
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    common = ["--quiet", "sweep", str(ckpt), "--attack", "pgd(steps=2)", "--eval-subset", "40", "--batch-size", "16"]
    assert _cli(*common, "--eps", "0,0.05", "--out", str(grown)).exit_code == 0
    assert _cli(*common, "--eps", "0,0.02,0.05", "--out", str(grown)).exit_code == 0
    assert _cli(*common, "--eps", "0,0.02,0.05", "--out", str(fresh)).exit_code == 0
    from robustse.store import ResultsStore

    a, b = (ResultsStore(d / "results.db").examples() for d in (grown, fresh))
    cols = ["attack", "eps", "idx", "adv_pred", "adv_margin"]
    key = ["attack", "eps", "idx"]
    assert a[cols].sort_values(key).reset_index(drop=True).equals(b[cols].sort_values(key).reset_index(drop=True))


def test_a_rejected_experiment_leaves_the_runs_spec_alone(tiny_run, tmp_path):
    """Item 2: a rejected experiment used to rewrite spec.toml, so the next report used its settings."""
    spec, out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    kept = (run / "spec.toml").read_text()
    import tomllib

    from robustse.config import dump_toml

    data = tomllib.loads(kept)
    data["report"]["alpha"] = 0.2  # what the next report would silently use
    data["sweep"]["attacks"] = [*data["sweep"]["attacks"], {"name": "pgd", "steps": 1.5}]  # refused
    bad = dump_toml(data)
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    res = _cli("experiment", "--spec", str(path), "--out", str(run))
    assert res.exit_code == 2, res.output
    assert (run / "spec.toml").read_text() == kept
