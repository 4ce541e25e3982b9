"""Hostile inputs, round 3 (README "Reliability"): nothing is written through a symbolic link or
outside the run directory, no temporary file survives an error, and no markup from a name passes
into ``report.md``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from robustse import files
from robustse.cli import cli
from robustse.errors import WriteError


def _cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _copy_run(out: Path, to: Path) -> Path:
    to.mkdir()
    for name in ("results.db", "models.csv", "manifest.json", "spec.toml"):
        shutil.copy(out / name, to / name)
    return to


def _leftovers(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if ".tmp" in p.name]


def test_report_replaces_links_at_its_file_names_and_never_follows_them(tiny_run, tmp_path):
    run = _copy_run(tiny_run[1], tmp_path / "run")
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
    run = _copy_run(tiny_run[1], tmp_path / "run")
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
