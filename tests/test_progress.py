"""Progress on long jobs: a bar on a terminal, else a log line at most every 30 s, from every long
loop (training, sweep, drift, evaluation, gate means, image decoding, the report's figures)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from robustse.core.progress import Progress, duration, eta, progress_settings


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_at_most_every_30_s_with_count_share_and_time_left():
    clock, lines = Clock(), []
    with progress_settings(terminal=False, log=lines.append, clock=clock):
        bar = Progress(10, "sweep")
        for t in (5, 12, 31, 45, 59, 62, 70, 80, 95, 100):  # step k done at time t
            clock.now = t
            bar.update()
        bar.close()
    assert lines == [
        "sweep: 3/10 batch (30%), 31 s so far, about 1 min 12 s left",
        "sweep: 6/10 batch (60%), 1 min 02 s so far, about 41 s left",
        "sweep: 9/10 batch (90%), 1 min 35 s so far, about 11 s left",
    ]  # and none when the job is done: its caller says so


def test_a_short_job_writes_nothing_and_postfix_figures_follow_the_count():
    clock, lines = Clock(), []
    with progress_settings(terminal=False, log=lines.append, clock=clock):
        with Progress(4, "train") as bar:
            clock.now = 29.0
            bar.update(3)  # under 30 s: no line
        with Progress(4, "train") as bar:  # started at 29 s
            bar.set_postfix(loss="0.4100")
            clock.now = 89.0
            bar.update()
    assert lines == ["train: 1/4 batch (25%), 1 min 00 s so far, about 3 min 00 s left (loss=0.4100)"]


def test_a_terminal_gets_a_bar_and_quiet_gets_nothing(capsys):
    lines: list[str] = []
    with progress_settings(terminal=True, log=lines.append, every=0), Progress(3, "sweep") as bar:
        assert bar.bar is not None
        bar.update(2)
    assert "sweep" in capsys.readouterr().err and lines == []
    with progress_settings(terminal=False, log=lines.append, every=0, show=False), Progress(3, "sweep") as bar:
        bar.update()
    with progress_settings(terminal=False, log=lines.append, every=0), Progress(3, "x", show=False) as bar:
        bar.update()
    assert bar.bar is None and lines == []


def test_without_a_logger_lines_go_to_stderr(capsys):
    with progress_settings(terminal=False, every=0), Progress(2, "drift") as bar:
        bar.update()
    assert capsys.readouterr().err == "drift: 1/2 batch (50%), 0 s so far, about 0 s left\n"


def test_durations_read_as_minutes_and_seconds():
    assert duration(59.4) == "59 s" and duration(60) == "1 min 00 s" and duration(3725) == "62 min 05 s"
    assert eta(30.0, 1, 4) == "1 min 30 s" and eta(10.0, 2, 4) == "10 s" and eta(5.0, 5, 4) == "0 s"


@pytest.fixture
def every_step():
    """Settings under which every step but the last writes a line (collected here)."""
    lines: list[str] = []
    ticks = itertools.count()
    with progress_settings(terminal=False, log=lines.append, every=0, clock=lambda: float(next(ticks))):
        yield lines


def _jobs(lines: list[str]) -> set[str]:
    return {line.split(":")[0] for line in lines}


def test_evaluation_gate_means_and_drift_count_their_batches(tiny_run, every_step):
    from robustse.attacks import create_attack
    from robustse.data.datasets import load_split
    from robustse.experiment.drift import measure_drift
    from robustse.models.checkpoint import load_checkpoint
    from robustse.probes.capture import gate_means
    from robustse.training.predict import predict

    _, _, run = tiny_run
    se = next(r for r in run.rows if r.se)
    model, _ = load_checkpoint(se.checkpoint)
    ds = load_split("fashion-mnist", split="test").subset(60, seed=0)
    predict(model, ds, batch_size=20)
    gate_means(model, ds.x, batch_size=20)
    measure_drift(model, ds.x, ds.y, attack=create_attack("fgsm"), eps=0.05, batch_size=20)
    assert _jobs(every_step) == {"predict", "gate means", "drift"}
    assert "predict: 2/3 batch (67%), 2 s so far, about 1 s left" in every_step


def test_image_folders_count_decoded_images(tmp_path, every_step):
    from PIL import Image

    from robustse.data.folder import load_image_folder
    from robustse.models.external import Preprocess

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(40):
            Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)).save(tmp_path / c / f"{i}.png")
    load_image_folder(f"imagefolder:{tmp_path}", "test", Preprocess((8, 8), 1.0, "bilinear")).subset(None)
    assert every_step == ["decode test: 64/80 image (80%), 1 s so far, about 0 s left"]  # 64 images a batch


def test_the_report_counts_its_figures_and_logs_its_stages(tiny_run, tmp_path, every_step):
    from robustse.analysis.report import build_report

    _, out, _ = tiny_run
    stages: list[str] = []
    build_report(out, out_dir=tmp_path / "again", log=stages.append, n_boot=50)
    assert [s for s in stages if s.startswith("report ")] == [
        "report 1/3: statistics", "report 2/3: figures", "report 3/3: tables and pages"
    ]  # fmt: skip
    assert _jobs(every_step) == {"report figures"} and len(every_step) == 10  # 11 figures


def test_the_sweep_counts_batches_and_says_each_ladder_k_of_n(tiny_run, tmp_path, every_step):
    from robustse.core.config import SweepConfig
    from robustse.experiment.setup import sweep_checkpoints

    _, _, run = tiny_run
    paths = [r.checkpoint for r in run.rows[:2]]
    cfg = SweepConfig(epsilons=(0.0, 0.05), attacks=({"name": "fgsm"},), eval_subset=40, batch_size=20, probes=False)
    logged: list[str] = []
    sweep_checkpoints(paths, cfg, tmp_path / "sweep", log=logged.append)
    assert any(line.startswith("sweep: 1/") for line in every_step)
    done = [line for line in logged if line.startswith("sweep: ladder ")]
    # fgsm and the noise control, for each of the two models
    assert [d.split(" (")[0] for d in done] == [f"sweep: ladder {k}/4 done" for k in range(1, 5)]
    assert done[-1].endswith("about 0 s left")


def test_the_cli_writes_progress_lines_to_stderr_unless_quiet(tiny_run, every_step):
    from robustse.cli import cli

    ckpt = str(tiny_run[2].rows[0].checkpoint)
    args = ["eval", ckpt, "--eval-subset", "100", "--batch-size", "25"]
    loud = CliRunner().invoke(cli, args)
    assert loud.exit_code == 0, loud.output
    assert "predict: 1/4 batch (25%)" in loud.stderr and "predict" not in loud.stdout
    quiet = CliRunner().invoke(cli, ["--quiet", *args])
    assert quiet.exit_code == 0 and "predict" not in quiet.stderr
    assert every_step == []  # the CLI's lines went through its own logger


def test_training_counts_batches_per_epoch(real_fmnist, tmp_path, every_step):
    from robustse.core.config import DataConfig, TrainConfig
    from robustse.training.train import train_model

    torch.manual_seed(0)
    data, cfg = DataConfig(train_subset=256, eval_subset=64), TrainConfig(epochs=1, augment=False, batch_size=64)
    train_model("small_cnn", out=Path(tmp_path) / "m.safetensors", data=data, train=cfg, seed=0)
    assert "small_cnn s0 ep 1/1: 3/4 batch (75%)" in " ".join(every_step)


def test_experiment_passes_verbose_to_its_sweep(tiny_run, tmp_path):
    """A rerun of the finished tiny run through the CLI: --verbose adds the sweep's detail lines."""
    import shutil

    from robustse.cli import cli

    copy = tmp_path / "run"
    shutil.copytree(tiny_run[1], copy)
    args = ["experiment", "--spec", str(copy / "spec.toml"), "--out", str(copy)]
    verbose = CliRunner().invoke(cli, ["--verbose", *args])
    assert verbose.exit_code == 0, verbose.output
    assert "cells to run: 0" in verbose.stderr  # every cell was reused
