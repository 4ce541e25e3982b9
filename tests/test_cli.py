"""The CLI: commands work, and every user error is one stderr line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import robustse as rs
from robustse.cli import cli

ROOT = Path(__file__).parent.parent


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def assert_user_error(result, *needles: str) -> None:
    """Exit code 2, exactly one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fake_fmnist):
    """A checkpoint trained through the CLI on the toy dataset."""
    out = tmp_path_factory.mktemp("ckpt") / "se.safetensors"
    res = run(
        "--quiet",
        "train",
        "se_small_cnn",
        "--epochs",
        "1",
        "--no-augment",
        "--data-root",
        str(fake_fmnist),
        "--out",
        str(out),
        "--reduction",
        "2",
    )
    assert res.exit_code == 0, res.output
    assert "clean accuracy" in res.stdout and "95% CI" in res.stdout
    return out


def test_models_lists_the_registry():
    res = run("models")
    assert res.exit_code == 0
    for name in rs.list_models():
        assert name in res.stdout
    rows = json.loads(run("models", "*resnet*", "--json").stdout)["result"]
    assert [r["name"] for r in rows] == ["resnet20", "se_resnet20", "static_resnet20"]
    assert rows[1]["gates"] == 9 and rows[0]["gates"] == 0 and rows[1]["twin"] == "resnet20"
    assert rows[2]["gates"] == 0 and rows[2]["kind"] == "static"  # a learned scale, not a gate


def test_inspect_name_shows_gates():
    res = run("inspect", "se_resnet20")
    assert res.exit_code == 0
    assert "SE gates found: 9" in res.stdout and "blocks.8.se.gate" in res.stdout
    assert "SE gates found: 0 (a plain model)" in run("inspect", "resnet20").stdout
    tv = json.loads(run("inspect", "torchvision:mobilenet_v3_small", "--json").stdout)["result"]
    assert len(tv["gates"]) == 9 and tv["gates"][0]["type"] == "Hardsigmoid"


def test_train_eval_inspect_checkpoint(trained, fake_fmnist):
    res = run("eval", str(trained), "--data-root", str(fake_fmnist))
    assert res.exit_code == 0 and "se_small_cnn on fashion-mnist: clean accuracy" in res.stdout
    data = json.loads(run("eval", str(trained), "--data-root", str(fake_fmnist), "--json").stdout)["result"]
    meta = rs.load_checkpoint(trained)[1]
    assert data["clean_accuracy"] == pytest.approx(meta["clean_accuracy"])
    assert data["ci95"][0] <= data["clean_accuracy"] <= data["ci95"][1] and data["eval_examples"] == 200
    info = run("inspect", str(trained))
    assert info.exit_code == 0 and "seed: 0" in info.stdout and "SE gates found: 2" in info.stdout


def test_train_seed_reaches_training(tmp_path, fake_fmnist):
    res = run(
        "--quiet",
        "train",
        "small_cnn",
        "--seed",
        "7",
        "--epochs",
        "1",
        "--data-root",
        str(fake_fmnist),
        "--train-subset",
        "64",
        "--out",
        str(tmp_path / "m.safetensors"),
    )
    assert res.exit_code == 0, res.output
    assert rs.load_checkpoint(tmp_path / "m.safetensors")[1]["seed"] == 7


# --------------------------------------------------------------------------- error paths


def test_unknown_architecture():
    assert_user_error(run("train", "resnet21"), "unknown architecture 'resnet21'", "se_resnet20")
    assert_user_error(run("inspect", "vgg99"), "unknown architecture 'vgg99'")


def test_unknown_torchvision_architecture():
    assert_user_error(run("inspect", "torchvision:resnet181"), "unknown torchvision classifier", "resnet18")


def test_bad_numbers(fake_fmnist):
    assert_user_error(run("train", "small_cnn", "--epochs", "0"), "--epochs", "0")
    assert_user_error(run("train", "small_cnn", "--adv-eps", "2"), "--adv-eps")
    assert_user_error(run("train", "small_cnn", "--lr", "-1"), "--lr")
    assert_user_error(run("train", "small_cnn", "--train-subset", "0"), "--train-subset")


def test_unknown_dataset_and_choice():
    assert_user_error(run("train", "small_cnn", "--dataset", "imagenet"), "imagenet", "fashion-mnist")
    assert_user_error(run("--device", "tpu", "models"), "tpu")


def test_missing_data(tmp_path):
    assert_user_error(run("train", "small_cnn", "--data-root", str(tmp_path)), "not found in", "apt-get install")


def test_se_option_on_plain_model():
    assert_user_error(run("train", "small_cnn", "--reduction", "4"), "small_cnn has no SE blocks", "se_small_cnn")


def test_missing_and_truncated_checkpoint(tmp_path, trained):
    assert_user_error(run("eval", str(tmp_path / "nope.safetensors")), "checkpoint not found")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(trained.read_bytes()[:500])
    assert_user_error(run("eval", str(bad)), "corrupt or truncated")


def test_malicious_pickle_via_cli(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    assert_user_error(run("eval", str(path), "--arch", "small_cnn"), "refused")
    assert_user_error(run("inspect", str(path), "--arch", "small_cnn"), "refused")
    assert not marker.exists()


def test_foreign_checkpoint_without_arch(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(rs.create_model("small_cnn").state_dict(), path)
    assert_user_error(run("eval", str(path)), "pass --arch")
    assert_user_error(run("eval", str(path), "--arch", "small_cnn", "--num-classes", "3"), "does not fit small_cnn")


def test_checkpoint_against_data_with_other_channels(tmp_path, trained, monkeypatch):
    import pickle

    import torchvision.datasets as tvd

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["test_batch", "batches.meta"]:
        with open(folder / name, "wb") as fh:
            pickle.dump(
                {"data": torch.zeros(2, 3072, dtype=torch.uint8).numpy(), "labels": [0, 1], "label_names": ["a"] * 10},
                fh,
            )
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: True)
    assert_user_error(
        run("eval", str(trained), "--dataset", "cifar10", "--data-root", str(tmp_path)),
        "3 channel(s) but the model takes 1",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_gpu():
    assert_user_error(run("--device", "cuda", "eval", "x.safetensors"), "CUDA is not available")
    assert_user_error(run("--device", "cuda:1", "eval", "x.safetensors"), "CUDA is not available")
    assert_user_error(run("--device", "tpu", "eval", "x.safetensors"), "unknown device 'tpu'")


def test_unknown_command_and_option():
    assert_user_error(run("tran"), "No such command 'tran'")
    assert_user_error(run("models", "--colour"), "--colour")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("epochs = 3", "unknown key 'epochs'"),
        ("[train]\nepochs = 'x'", "train.epochs: expected int"),
        ("[train", "invalid TOML"),
        ("[models]\ntwins = ['se_cnn']", "name the plain twin ('cnn')"),
        ("[models]\ntwins = ['nope']", "unknown architecture 'nope'"),
    ],
)
def test_bad_experiment_specs(tmp_path, text, needle):
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    assert_user_error(run("experiment", "--spec", str(spec), "--out", str(tmp_path / "run")), needle)


def test_experiment_spec_missing_and_out_is_a_file(tmp_path):
    assert_user_error(run("experiment", "--spec", str(tmp_path / "none.toml")), "spec file not found")
    spec = tmp_path / "ok.toml"
    spec.write_text("[train]\nepochs = 1\n")
    taken = tmp_path / "taken"
    taken.write_text("results I care about")
    assert_user_error(run("experiment", "--spec", str(spec), "--out", str(taken)), "not a directory")
    assert taken.read_text() == "results I care about"


def test_real_process_shim_and_console_script(tmp_path):
    """Through a real interpreter: the shim works and a user error has no traceback."""
    ok = subprocess.run([sys.executable, str(ROOT / "cli.py"), "models", "small*"], capture_output=True, text=True)
    assert ok.returncode == 0 and "se_small_cnn" in ok.stdout
    script = Path(sys.executable).parent / "robustse"
    bad = subprocess.run([str(script), "eval", str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: checkpoint not found")
