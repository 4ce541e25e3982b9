"""One CLI convention (README "Command line"): every option has help text and shows its default,
every command takes --json with one strict envelope, every command that draws random numbers takes
--seed, unrelated sweeps never share a store, and fallbacks warn."""

from __future__ import annotations

import json
import shutil

import click
import pytest
from click.testing import CliRunner

from robustse import __version__
from robustse.cli import cli
from robustse.cli.attack_commands import default_sweep_dir

COMMANDS = sorted(cli.commands)
RANDOM = {"train", "sweep", "drift", "report"}  # commands that draw random numbers (experiment: from its spec)


def _shows_default(option: click.Option) -> bool:
    """The default is in --help: shown by click, or described in the help text ("[default: ...]")."""
    if option.is_flag or option.multiple or option.required:
        return True
    if option.show_default:
        return True
    return "[default" in (option.help or "")


@pytest.mark.parametrize("name", ["robustse", *COMMANDS])
def test_every_option_has_help_and_shows_its_default(name):
    command = cli if name == "robustse" else cli.commands[name]
    help_text = CliRunner().invoke(cli, ([] if name == "robustse" else [name]) + ["--help"]).output
    for option in (p for p in command.params if isinstance(p, click.Option)):
        label = f"{name} {option.opts[0]}"
        assert option.help, f"{label} has no help text"
        assert _shows_default(option), f"{label}: its default is not shown"
        assert option.opts[0] in help_text, label


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_json_and_the_random_ones_a_seed(name):
    params = {p.name for p in cli.commands[name].params}
    assert "as_json" in params, f"{name} has no --json"
    assert ("seed" in params) == (name in RANDOM), name
    assert "seed" not in {p.name for p in cli.params}  # no global --seed that some commands would ignore


@pytest.fixture(scope="module")
def nan_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run: two seed pairs, so the seed-level statistics hold NaN (too few seeds)."""
    _, out, _ = tiny_run
    copy = tmp_path_factory.mktemp("nan") / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("report.*", "figures"))
    return copy


def _strict(text: str) -> object:
    def refuse(token):  # type: ignore[no-untyped-def]
        raise AssertionError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "args",
    [["models", "small*"], ["attacks"], ["inspect", "se_small_cnn"], ["report", "{run}", "--bootstrap", "100"]],
    ids=lambda a: a[0],
)
def test_json_is_one_strict_envelope_even_with_nan_statistics(nan_run, args):
    argv = ["--quiet", *[a.format(run=nan_run) for a in args], "--json"]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 0, res.output
    payload = _strict(res.stdout)
    assert isinstance(payload, dict) and set(payload) == {"command", "version", "result"}
    assert payload["command"] == args[0] and payload["version"] == __version__
    if args[0] == "report":  # the run's NaN statistics come out as null
        assert _has_null(payload["result"])


def _has_null(value: object) -> bool:
    if isinstance(value, dict):
        return any(_has_null(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_null(v) for v in value)
    return value is None


def test_unrelated_sweeps_get_their_own_store_and_the_same_models_the_same_one():
    a = default_sweep_dir(["reports/quick/models/se_small_cnn_s0.safetensors"])
    b = default_sweep_dir(["reports/quick/models/small_cnn_s0.safetensors"])
    assert a != b and a.parent.name == "reports" and a.name.startswith("sweep-se_small_cnn_s0-")
    assert default_sweep_dir(["reports/quick/models/se_small_cnn_s0.safetensors"]) == a
    assert default_sweep_dir(["resnet20=../w/../x y?.pth"]).name.startswith("sweep-x-y-")


def test_a_sweep_without_out_says_where_it_wrote(trained_small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = str(trained_small[3])
    args = ["sweep", ckpt, "--attack", "fgsm", "--eps", "0,0.05", "--eval-subset", "16", "--no-probes"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    where = default_sweep_dir([ckpt])
    assert f"results: {where / 'results.db'}" in res.stdout and (tmp_path / where / "results.db").is_file()


def test_a_gallery_eps_off_the_ladder_warns(nan_run):
    res = CliRunner().invoke(cli, ["--quiet", "report", str(nan_run), "--bootstrap", "100", "--gallery-eps", "0.5"])
    assert res.exit_code == 0, res.output
    assert "warning: gallery eps 0.5 is not on the ladder" in res.stderr
    quiet = CliRunner().invoke(cli, ["--quiet", "report", str(nan_run), "--bootstrap", "100"])
    assert "warning" not in quiet.stderr


# --------------------------------------------------------------------------- the pairing rule of ARCH=WEIGHTS


@pytest.fixture(scope="module")
def twin_weights(tmp_path_factory):
    """An SE model and its plain twin as plain PyTorch state dicts (foreign weights, no metadata)."""
    import torch

    import robustse as rs

    folder = tmp_path_factory.mktemp("weights")
    for arch in ("se_small_cnn", "small_cnn"):
        torch.manual_seed(0)
        torch.save(rs.create_model(arch, num_classes=10, in_channels=1).state_dict(), folder / f"{arch}_w.pth")
    return folder


@pytest.mark.parametrize("order", [("se_small_cnn", "small_cnn"), ("small_cnn", "se_small_cnn")])
def test_foreign_twins_pair_whatever_their_order(twin_weights, tmp_path, order):
    """ARCH=WEIGHTS models without a seed in their names are seed 0, so an SE model and its plain
    twin pair (they used to get seeds from their row order and, given plain first, never paired)."""
    import pandas as pd

    run = tmp_path / "run"
    models = [f"{arch}={twin_weights / f'{arch}_w.pth'}" for arch in order]
    res = CliRunner().invoke(cli, ["--quiet", "sweep", *models, "--attack", "fgsm", "--eps", "0,0.05",
                                   "--eval-subset", "32", "--no-probes", "--out", str(run)])  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = CliRunner().invoke(cli, ["--quiet", "report", str(run), "--bootstrap", "100"])
    assert rep.exit_code == 0, rep.output
    primary = pd.read_csv(run / "stats.csv").query("endpoint == 'primary'")
    assert len(primary) == 1 and primary.n_pairs.iloc[0] == 1 and primary.verdict.iloc[0] == "too few seeds"


def test_two_unseeded_models_of_one_kind_are_refused_with_the_way_out(twin_weights, tmp_path):
    import shutil as sh

    other = tmp_path / "other_w.pth"
    sh.copy(twin_weights / "se_small_cnn_w.pth", other)
    run = tmp_path / "run"
    models = [f"se_small_cnn={twin_weights / 'se_small_cnn_w.pth'}", f"se_small_cnn={other}"]
    res = CliRunner().invoke(cli, ["--quiet", "sweep", *models, "--attack", "fgsm", "--eps", "0,0.05",
                                   "--eval-subset", "16", "--no-probes", "--out", str(run)])  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = CliRunner().invoke(cli, ["--quiet", "report", str(run), "--bootstrap", "100"])
    assert rep.exit_code == 2
    assert "are both seed 0 of se small_cnn" in rep.stderr and "_s<seed>" in rep.stderr
    assert len(rep.stderr.strip().splitlines()) == 1
    for i, name in enumerate(("a_s1.pth", "b_s2.pth")):
        sh.copy(twin_weights / "se_small_cnn_w.pth", tmp_path / name)
        models[i] = f"se_small_cnn={tmp_path / name}"
    seeded = tmp_path / "seeded"
    res = CliRunner().invoke(cli, ["--quiet", "sweep", *models, "--attack", "fgsm", "--eps", "0,0.05",
                                   "--eval-subset", "16", "--no-probes", "--out", str(seeded)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert CliRunner().invoke(cli, ["--quiet", "report", str(seeded), "--bootstrap", "100"]).exit_code == 0


def test_experiment_warns_of_the_same_fallbacks_as_report(tiny_run, tmp_path):
    """The spec's [report] gallery_eps off the ladder: `experiment` warns as `report` does."""
    import dataclasses

    from robustse.core.config import dump_toml

    spec, out, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    spec_file = tmp_path / "tiny.toml"
    changed = dataclasses.replace(spec, report=dataclasses.replace(spec.report, gallery_eps=0.5))
    spec_file.write_text(dump_toml(dataclasses.asdict(changed)), encoding="utf-8")
    res = CliRunner().invoke(cli, ["--quiet", "experiment", "--spec", str(spec_file), "--out", str(copy), "--json"])
    assert res.exit_code == 0, res.output
    assert "warning: gallery eps 0.5 is not on the ladder" in res.stderr
    assert _strict(res.stdout)["command"] == "experiment"  # type: ignore[index]
