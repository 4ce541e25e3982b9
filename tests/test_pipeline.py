"""End to end on real Fashion-MNIST (small subsets): spec → twins over seeds → run directory."""

from __future__ import annotations

import csv
import json

from click.testing import CliRunner

from robustse.cli import cli
from robustse.config import DataConfig, ExperimentSpec, ModelsConfig, SweepConfig, TrainConfig
from robustse.pipeline import run_experiment


def test_experiment_end_to_end_and_resume(tmp_path, real_fmnist):
    spec = ExperimentSpec(
        name="tiny",
        seeds=(0, 1),
        data=DataConfig(train_subset=3000, eval_subset=1000),
        models=ModelsConfig(twins=("small_cnn",), se_options={"reduction": 2}),
        train=TrainConfig(epochs=2, augment=False),
        sweep=SweepConfig(epsilons=(0.0, 0.05), attacks=({"name": "fgsm"}, {"name": "noise"}), eval_subset=100),
    )
    out = tmp_path / "run"
    res = run_experiment(spec, out, progress=False)
    assert [(r.model, r.seed) for r in res.rows] == [
        ("small_cnn", 0),
        ("se_small_cnn", 0),
        ("small_cnn", 1),
        ("se_small_cnn", 1),
    ]
    for r in res.rows:
        assert r.clean_accuracy > 0.7, r  # real data, 3,000 training images: well above chance (0.1)
        assert r.ci_low < r.clean_accuracy < r.ci_high and r.eval_examples == 1000
    assert res.rows[0].checkpoint != res.rows[2].checkpoint
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seeds"] == [0, 1] and set(manifest["timings_seconds"]) == {"data", "train", "sweep"}
    assert res.sweep is not None and res.sweep.computed_cells == 4 * 2 * 2  # models x attacks x eps
    assert {c.status for c in res.sweep.checks} <= {"pass", "warn"}
    robust = res.sweep.robust
    assert set(robust.model) == {"small_cnn_s0", "se_small_cnn_s0", "small_cnn_s1", "se_small_cnn_s1"}
    acc = robust.pivot(index="model", columns="eps", values="accuracy")
    assert (acc[0.05] < acc[0.0]).all()  # FGSM at 0.05 really hurts every model
    assert manifest["versions"]["torch"] and len(manifest["models"]) == 4
    with (out / "models.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert "reduction = 2" in (out / "spec.toml").read_text()

    again = run_experiment(spec, out, progress=False)  # everything is reused, nothing retrained
    assert [r.clean_accuracy for r in again.rows] == [r.clean_accuracy for r in res.rows]
    assert again.timings["train"] < res.timings["train"] / 2
    assert again.sweep is not None and again.sweep.computed_cells == 0


def test_experiment_command(tmp_path, real_fmnist):
    spec = tmp_path / "mini.toml"
    spec.write_text(
        "seeds = [3]\n[data]\ntrain_subset = 500\neval_subset = 200\n[train]\nepochs = 1\naugment = false\n"
    )
    res = CliRunner().invoke(cli, ["--quiet", "experiment", "--spec", str(spec), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "se_small_cnn" in res.stdout and "run directory" in res.stdout
    assert (tmp_path / "r" / "models" / "se_small_cnn_s3.safetensors").exists()
