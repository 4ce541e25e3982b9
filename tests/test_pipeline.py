"""End to end on real Fashion-MNIST (small subsets): spec → twins over seeds → run directory."""

from __future__ import annotations

import csv
import json

from click.testing import CliRunner

from robustse.cli import cli
from robustse.core.config import DataConfig, ExperimentSpec, ModelsConfig, SweepConfig, TrainConfig
from robustse.experiment.pipeline import run_experiment


def test_experiment_end_to_end_and_resume(tiny_run):
    spec, out, res = tiny_run
    assert [(r.label, r.model, r.seed, r.arm) for r in res.rows] == [
        ("small_cnn_s0", "small_cnn", 0, "main"),
        ("se_small_cnn_s0", "se_small_cnn", 0, "main"),
        ("small_cnn_s1", "small_cnn", 1, "main"),
        ("se_small_cnn_s1", "se_small_cnn", 1, "main"),
    ]
    for r in res.rows:
        assert r.clean_accuracy > 0.7, r  # real data, 3,000 training images: well above chance (0.1)
        assert r.ci_low < r.clean_accuracy < r.ci_high and r.eval_examples == 1000
    assert res.rows[0].checkpoint != res.rows[2].checkpoint
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seeds"] == [0, 1] and set(manifest["timings_seconds"]) == {"data", "train", "sweep", "report"}
    assert res.sweep is not None and res.sweep.computed_cells == 4 * 2 * 3  # models x attacks x eps
    assert {c.status for c in res.sweep.checks} <= {"pass", "warn"}
    robust = res.sweep.robust
    assert set(robust.model) == {"small_cnn_s0", "se_small_cnn_s0", "small_cnn_s1", "se_small_cnn_s1"}
    acc = robust.pivot(index="model", columns="eps", values="accuracy")
    assert (acc[0.05] < acc[0.0]).all()  # FGSM at 0.05 really hurts every model
    assert manifest["versions"]["torch"] and len(manifest["models"]) == 4
    with (out / "models.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert "reduction = 2" in (out / "spec.toml").read_text()
    # the report: verdicts for every measurement at eps > 0, computed (not constant) numbers
    rep = res.report
    assert rep is not None and rep.html.exists() and rep.markdown.exists()
    c = rep.comparison
    assert set(c.eps) == {0.05, 0.1} and set(c.measurement) >= {"robust_accuracy", "logit_sensitivity", "kl"}
    assert set(c.verdict) == {"too few seeds"}  # 2 seed pairs: estimates and CIs, no verdict
    assert ((c.ci_low <= c["diff"]) & (c["diff"] <= c.ci_high)).all()
    for name in ("stats.csv", "damping.csv", "interventions.csv", "blocks.csv", "results.csv"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "figures").glob("*.png"))) == 11

    again = run_experiment(spec, out, progress=False)  # everything is reused, nothing retrained
    assert [r.clean_accuracy for r in again.rows] == [r.clean_accuracy for r in res.rows]
    assert again.timings["train"] < res.timings["train"] / 2
    assert again.sweep is not None and again.sweep.computed_cells == 0
    # the same store gives the same statistics (seeded resampling)
    assert again.report.comparison[["diff", "ci_low", "ci_high", "p_adjusted"]].equals(
        c[["diff", "ci_low", "ci_high", "p_adjusted"]]
    )


def test_experiment_command(tmp_path, real_fmnist):
    spec = tmp_path / "mini.toml"
    spec.write_text(
        "seeds = [3]\n[data]\ntrain_subset = 500\neval_subset = 200\n[train]\nepochs = 1\naugment = false\n"
    )
    res = CliRunner().invoke(cli, ["--quiet", "experiment", "--spec", str(spec), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "se_small_cnn" in res.stdout and "run directory" in res.stdout
    assert (tmp_path / "r" / "models" / "se_small_cnn_s3.safetensors").exists()


def test_experiment_on_given_checkpoints_trains_nothing(tiny_run, tmp_path):
    from robustse.core.config import ReportConfig

    spec, out, res = tiny_run
    given = ExperimentSpec(
        name="given",
        seeds=(0,),
        data=spec.data,
        models=ModelsConfig(checkpoints=(str(out / "models" / "*_s1.safetensors"),)),
        sweep=SweepConfig(epsilons=(0.0, 0.05), attacks=({"name": "fgsm"},), eval_subset=60, probe_subsample=20),
        report=ReportConfig(bootstrap=200),
    )
    run = run_experiment(given, tmp_path / "given", progress=False)
    assert sorted((r.label, r.seed, r.se) for r in run.rows) == [
        ("se_small_cnn_s1", 1, True),
        ("small_cnn_s1", 1, False),
    ]
    assert run.timings["train"] < 1.0 and not (tmp_path / "given" / "models" / "small_cnn_s1.safetensors").exists()
    assert run.report is not None and set(run.report.comparison.measurement) >= {"robust_accuracy"}
    # noise was added as the control of the fgsm attack
    assert set(run.sweep.cells.attack) == {"fgsm", "noise"}


def test_two_arm_experiment_compares_the_se_only_arm_with_the_first_plain(real_fmnist, tmp_path):
    from robustse.core.config import ArmConfig, ReportConfig

    spec = ExperimentSpec(
        name="arms",
        seeds=(0,),
        data=DataConfig(train_subset=600, eval_subset=200),
        models=ModelsConfig(twins=("small_cnn",)),
        train=TrainConfig(epochs=1, augment=False),
        arms=(ArmConfig(name="base"), ArmConfig(name="r2", se_options={"reduction": 2}, plain=False)),
        sweep=SweepConfig(epsilons=(0.0, 0.05), attacks=({"name": "fgsm"},), eval_subset=40, probe_subsample=10),
        report=ReportConfig(bootstrap=200),
    )
    run = run_experiment(spec, tmp_path / "arms", progress=False)
    assert [r.label for r in run.rows] == ["small_cnn_base_s0", "se_small_cnn_base_s0", "se_small_cnn_r2_s0"]
    from robustse.models.checkpoint import read_metadata

    assert read_metadata(run.rows[2].checkpoint)["arch_kwargs"]["reduction"] == 2
    c = run.report.comparison
    assert set(c.arm) == {"base", "r2"}
    base = c[(c.arm == "base") & (c.measurement == "robust_accuracy")].base_mean.tolist()
    r2 = c[(c.arm == "r2") & (c.measurement == "robust_accuracy")].base_mean.tolist()
    assert base == r2  # the same plain twin on both sides


def test_an_experiment_says_its_phase_and_model_k_of_n_with_the_time_left(tiny_run, tmp_path):
    """Rerun on a copy of the finished tiny run (models and cells reused): one line per phase and
    per model, k / N with an estimate of the time left."""
    import shutil

    from robustse.experiment.pipeline import eta, run_experiment

    spec, out, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    lines: list[str] = []
    run_experiment(spec, copy, progress=False, log=lines.append)
    assert [line for line in lines if line.startswith("phase ")] == [
        "phase 1/4: data", "phase 2/4: train", "phase 3/4: sweep", "phase 4/4: report"
    ]  # fmt: skip
    done = [line for line in lines if line.startswith("train: model ")]
    assert len(done) == 4 and done[0].startswith("train: model 1/4 done (") and done[-1].endswith("about 0 s left")
    assert eta(30.0, 1, 4) == "1 min 30 s" and eta(10.0, 2, 4) == "10 s" and eta(5.0, 4, 4) == "0 s"
