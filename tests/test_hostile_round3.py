"""Hostile inputs, round 3 (README "Reliability"): nothing is written through a symbolic link or
outside the run directory, no temporary file survives an error, and no markup from a name passes
into ``report.md``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from robustse.cli import cli
from robustse.core import files
from robustse.core.errors import WriteError

from .conftest import copy_run


def _cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _leftovers(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if ".tmp" in p.name]


def test_report_replaces_links_at_its_file_names_and_never_follows_them(tiny_run, tmp_path):
    run = copy_run(tiny_run[1], tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "figures").mkdir()
    names = ["stats.csv", "blocks.csv", "squeeze.csv", "report.html", "report.md", "report.html.tmp",
             "figures/robust_accuracy.png"]  # fmt: skip
    for i, name in enumerate(names):
        target = outside / f"victim{i}"
        target.write_text("keep me")
        (run / name).symlink_to(target)
    res = _cli("--quiet", "report", str(run), "--bootstrap", "100")
    assert res.exit_code == 0, res.output
    assert all((outside / f"victim{i}").read_text() == "keep me" for i in range(len(names)))
    for name in ("stats.csv", "blocks.csv", "squeeze.csv", "report.html", "report.md", "figures/robust_accuracy.png"):
        assert not (run / name).is_symlink() and (run / name).stat().st_size > 0, name
    assert _leftovers(run) == [run / "report.html.tmp"]  # the planted link, untouched; nothing of ours


def test_a_linked_figures_directory_is_refused_in_one_line(tiny_run, tmp_path):
    run = copy_run(tiny_run[1], tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "figures").symlink_to(elsewhere, target_is_directory=True)
    res = _cli("--quiet", "report", str(run), "--bootstrap", "100")
    assert res.exit_code == 2 and "symbolic link" in res.output and len(res.output.strip().splitlines()) == 1
    assert list(elsewhere.iterdir()) == []


def test_a_dangling_results_db_link_never_creates_its_target(trained_small, tmp_path):
    _, _, _, ckpt = trained_small
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "elsewhere.db"
    (run / "results.db").symlink_to(target)
    res = _cli("--quiet", "sweep", str(ckpt), "--eval-subset", "16", "--eps", "0,0.05", "--out", str(run))
    assert res.exit_code == 2 and "symbolic link" in res.output and len(res.output.strip().splitlines()) == 1
    assert not target.exists()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "stats.csv"
    path.write_text("old")

    def half_then_fail(fh):  # type: ignore[no-untyped-def]
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match="No space left on device"):
        files.replace_file(path, half_then_fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["stats.csv"]
    with pytest.raises(KeyboardInterrupt):
        files.replace_file(path, lambda fh: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.csv"]


@pytest.mark.parametrize(
    "name", ["<img src=x onerror=alert(1)>", "a\n# injected heading\n| x | y |", "`code` *b* [l](u)"]
)
def test_names_pass_into_report_md_as_text_only(trained_small, tmp_path, name):
    _, _, _, ckpt = trained_small
    hostile = tmp_path / f"{name}_s0.safetensors"
    shutil.copy(ckpt, hostile)
    run = tmp_path / "run"
    res = _cli("--quiet", "sweep", str(hostile), "--eval-subset", "16", "--eps", "0,0.05", "--attack", "fgsm",
               "--attack", "noise", "--out", str(run))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert _cli("--quiet", "report", str(run), "--bootstrap", "100").exit_code == 0
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "<img" not in md and "`code`" not in md and "[l](u)" not in md
    headings = [line for line in md.splitlines() if line.startswith("#")]
    assert not any("injected" in h for h in headings)
    for block in _tables(md):  # a name never adds or removes a cell
        assert len({len(re.findall(r"(?<!\\)\|", line)) for line in block}) == 1, block


def _tables(md: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    previous = False
    for line in md.splitlines():
        row = line.startswith("|")
        if row and not previous:
            blocks.append([])
        if row:
            blocks[-1].append(line)
        previous = row
    return blocks


# --------------------------------------------------------------------------- the caller's model and tensors


@pytest.mark.parametrize("name", [*__import__("robustse").list_attacks(), "torchattacks:PGD"])
def test_attacks_give_every_module_back_its_own_mode_and_detached_results(name):
    """Item 5: a model with per-submodule modes (a frozen BatchNorm block inside a training model)
    used to come back with every submodule in the top-level mode."""
    import torch

    import robustse as rs

    torch.manual_seed(0)
    model = rs.create_model("se_small_cnn", num_classes=10, in_channels=1)
    model.train()
    model.blocks[0].eval()  # frozen BatchNorm statistics in the first stage
    before = {n: m.training for n, m in model.named_modules()}
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    res = rs.create_attack(name)(model, x, torch.tensor([0, 1, 2, 3]), epsilons=[0.0, 0.03])
    assert {n: m.training for n, m in model.named_modules()} == before
    assert all(not a.requires_grad and a.grad_fn is None for a in res.adversarials)  # never the caller's graph


# --------------------------------------------------------------------------- limits on every path


def _one_line_refusal(res, needle):  # type: ignore[no-untyped-def]
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    "eps, needle",
    [
        (",".join(["0.01"] * 1001), "limit is 1,000"),  # a comma list used to run 2,002 cells
        ("0:inf:1", "expected numbers like"),  # OverflowError
        ("0:1:nan", "expected numbers like"),
    ],
)
def test_eps_limits_hold_for_every_form_of_ladder(trained_small, tmp_path, eps, needle):
    _, _, _, ckpt = trained_small
    res = _cli("--quiet", "sweep", str(ckpt), "--eps", eps, "--out", str(tmp_path / "run"))
    _one_line_refusal(res, needle)
    assert not (tmp_path / "run" / "results.db").exists()


def _spec(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\nseeds = [0]\n[models]\ntwins = ["small_cnn"]\n' + body, encoding="utf-8")
    return path


def test_spec_limits_are_checked_when_the_spec_is_read(trained_small, tmp_path):
    _, _, _, ckpt = trained_small
    many_eps = "[sweep]\nepsilons = [" + ", ".join(["0.01"] * 100_000) + "]\n"
    res = _cli("--quiet", "experiment", "--spec", str(_spec(tmp_path, many_eps)), "--out", str(tmp_path / "a"))
    _one_line_refusal(res, "the limit is 1,000")
    spec = _spec(tmp_path, "")
    spec.write_text(spec.read_text().replace("[models]\n", f"[models]\ncheckpoints = {[str(ckpt)] * 5000!r}\n"))
    res = _cli("--quiet", "experiment", "--spec", str(spec), "--out", str(tmp_path / "b"))
    _one_line_refusal(res, "the limit is 1,000")
    deep = _spec(tmp_path, "[sweep]\nepsilons = " + "[" * 50_000 + "]" * 50_000 + "\n")
    res = _cli("--quiet", "experiment", "--spec", str(deep), "--out", str(tmp_path / "c"))
    _one_line_refusal(res, "nested too deeply")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_huge_architecture_named_by_a_small_checkpoint_is_refused_before_it_is_built(trained_small, tmp_path):
    """Item 3: metadata naming timm:vit_giant_patch14_224 beside 48 KB of weights built the model
    (4.7 GB resident) before refusing."""
    import json
    import resource

    from safetensors import safe_open
    from safetensors.torch import load_file, save

    _, _, _, ckpt = trained_small
    with safe_open(str(ckpt), "pt") as f:
        meta = json.loads(f.metadata()["robustse"])
    meta.update(arch="timm:vit_giant_patch14_224", arch_kwargs={})
    forged = tmp_path / "giant_s0.safetensors"
    forged.write_bytes(save(load_file(str(ckpt)), metadata={"robustse": json.dumps(meta)}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = _cli("--quiet", "eval", str(forged))
    _one_line_refusal(res, "refused before building the model")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1_000_000  # KiB: far below 4 GB


# --------------------------------------------------------------------------- run directories a user can break


def test_report_out_writes_elsewhere_and_leaves_the_run_directory_alone(tiny_run, tmp_path):
    """Item 7: a read-only run directory (report writes figures there) has `report --out DIR`."""
    run = copy_run(tiny_run[1], tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    res = _cli("--quiet", "report", str(run), "--bootstrap", "100", "--out", str(tmp_path / "elsewhere"))
    assert res.exit_code == 0, res.output
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    out = tmp_path / "elsewhere"
    assert (out / "report.html").stat().st_size > 0 and len(list((out / "figures").glob("*.png"))) == 11
    assert (out / "stats.csv").exists() and (out / "squeeze.csv").exists()


def test_a_run_directory_named_with_raw_bytes_sweeps_and_reports(trained_small, tmp_path):
    """Item 7: `--out` with non-UTF-8 bytes committed its cells, then failed in an export, and
    `report` left a 0-byte temporary; written files keep the usual permissions."""
    import os
    import subprocess
    import sys

    _, _, _, ckpt = trained_small
    name = os.fsdecode(b"run\xff")
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONUTF8": "0"}  # strict UTF-8 output streams

    def robustse(*args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        return subprocess.run([sys.executable, "-m", "robustse.cli", "--quiet", *args], cwd=tmp_path, env=env,
                              capture_output=True, timeout=300)  # fmt: skip

    res = robustse("sweep", str(ckpt), "--eval-subset", "16", "--eps", "0,0.05", "--attack", "fgsm", "--attack",
                   "noise", "--out", name)  # fmt: skip
    assert res.returncode == 0 and b"Traceback" not in res.stderr, res.stderr[-2000:]
    res = robustse("report", name, "--bootstrap", "100")
    assert res.returncode == 0 and b"Traceback" not in res.stderr, res.stderr[-2000:]
    run = tmp_path / name
    assert (run / "report.md").stat().st_size > 0 and _leftovers(run) == []
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "stats.csv").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    "change, needle",
    [
        (
            lambda m, x: (m.to(__import__("torch").bfloat16), x),
            "inputs are torch.float32 but the model's weights are torch.bfloat16",
        ),
        (lambda m, x: (m, x.double()), "inputs are torch.float64 but the model's weights are torch.float32"),
        (lambda m, x: (m, x.expand(-1, 3, -1, -1).contiguous()), "inputs have 3 channel(s) but the model takes 1"),
    ],
)
@pytest.mark.parametrize("name", ["fgsm", "pgd", "noise", "gate", "torchattacks:PGD"])
def test_inputs_the_model_cannot_take_are_attack_errors(name, change, needle):
    """Item 8: these raised torch's RuntimeError from deep inside a pass (or passed silently)."""
    import torch

    import robustse as rs
    from robustse.core.errors import AttackError

    model, x = change(rs.create_model("se_small_cnn", num_classes=10, in_channels=1), torch.rand(2, 1, 28, 28))
    with pytest.raises(AttackError, match=re.escape(needle)):
        rs.create_attack(name)(model, x, torch.tensor([0, 1]), epsilons=[0.0, 0.03])


# --------------------------------------------------------------------------- messages that say what is wrong

KILL_MID_WRITE = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.execute("PRAGMA cache_size=1")
conn.execute("BEGIN IMMEDIATE")
conn.execute("DELETE FROM examples")
conn.executemany("INSERT INTO checks VALUES (?, ?, ?, ?)", [(f"m{i}", "x" * 500, "pass", "y") for i in range(5000)])
os.kill(os.getpid(), 9)
"""


def test_a_store_killed_mid_write_is_named_as_such_and_recovers(tiny_run, tmp_path):
    """Item 9: `report` called a store with a hot journal "read-only ... (robustse report can still read it)"."""
    import sqlite3
    import subprocess
    import sys

    from robustse.core.store import ResultsStore

    run = copy_run(tiny_run[1], tmp_path / "run")
    with sqlite3.connect(run / "results.db") as conn:
        before = conn.execute("SELECT COUNT(*) FROM examples").fetchone()
    subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(run / "results.db")], check=False, timeout=120)
    assert (run / "results.db-journal").stat().st_size > 0  # the kill left a hot journal
    res = _cli("--quiet", "report", str(run), "--bootstrap", "100")
    _one_line_refusal(res, "a write was interrupted")
    assert "read-only" not in res.output and "corrupt" not in res.output
    ResultsStore(run / "results.db").close()  # what rerunning the sweep does first: SQLite rolls back
    with sqlite3.connect(run / "results.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM examples").fetchone() == before  # nothing lost
    assert _cli("--quiet", "report", str(run), "--bootstrap", "100").exit_code == 0


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_results_db_that_is_not_a_file_is_named_as_such(trained_small, tmp_path, kind):
    """Item 9: a FIFO said "free some disk space"; a directory said "corrupt" (sweep) and "no
    results.db here" (report)."""
    import os

    _, _, _, ckpt = trained_small
    run = tmp_path / "run"
    run.mkdir()
    if kind == "directory":
        (run / "results.db").mkdir()
    else:
        os.mkfifo(run / "results.db")
    needle = "is a directory" if kind == "directory" else "not a regular file"
    res = _cli("--quiet", "sweep", str(ckpt), "--eval-subset", "16", "--eps", "0,0.05", "--out", str(run))
    _one_line_refusal(res, needle)
    _one_line_refusal(_cli("--quiet", "report", str(run)), needle)


def test_sixteen_bit_photos_are_scaled_and_unrangeable_ones_refused_naming_the_file(tmp_path):
    """Item 6: a 16-bit PNG (32768 of 65535: mid-grey) was saturated to white (255)."""
    import numpy as np
    import torch
    from PIL import Image

    from robustse.data.folder import load_image_folder, prepare_image
    from robustse.models.external import Preprocess

    for cls, value in (("a", 32768), ("b", 65535)):
        (tmp_path / "f" / cls).mkdir(parents=True)
        Image.fromarray(np.full((40, 40), value, np.uint16)).save(tmp_path / "f" / cls / "x.png")
    folder = load_image_folder(f"imagefolder:{tmp_path / 'f'}", "test")
    ds = folder.decode(torch.arange(2))
    assert sorted(int(v) for v in ds.x.flatten(1).float().mean(1)) == [128, 255]
    flt = tmp_path / "float.tiff"  # not a folder suffix, but a decoder may meet one by another name
    Image.fromarray(np.full((40, 40), 0.5, np.float32)).save(flt)
    with pytest.raises(ValueError, match="F-mode pixels"):
        prepare_image(flt, Preprocess(size=(16, 16)))


def test_report_on_a_full_disk_is_one_line_and_leaves_nothing_behind(tiny_run, tmp_path, monkeypatch):
    """Item 7: a full disk gave a traceback and left a 60 KB temporary file."""
    import os

    run = copy_run(tiny_run[1], tmp_path / "run")
    real = os.replace

    def full(src, dst):  # type: ignore[no-untyped-def]
        if str(dst).endswith(".png"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", full)
    res = _cli("--quiet", "report", str(run), "--bootstrap", "100")
    _one_line_refusal(res, "No space left on device")
    assert _leftovers(run) == [] and not (run / "report.html").exists()
