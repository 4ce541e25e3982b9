"""The report: regenerated from the store, rendered by a real headless Chromium, and the arms of a spec."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from click.testing import CliRunner

from robustse.cli import cli
from robustse.core.config import ArmConfig, ExperimentSpec, ModelsConfig, from_mapping
from robustse.core.errors import SpecError
from robustse.experiment.pipeline import plan_models

from .conftest import copy_run

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
# Appended to a copy of the page: after every image has loaded (or failed), count the broken ones.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-broken', imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length);
  document.body.setAttribute('data-scroll-width', document.documentElement.scrollWidth);
});</script>"""
WIDTH = 1400  # the page must fit this window without horizontal scrolling


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("ROBUSTSE_SKIP_BROWSER") == "1":
            pytest.skip("ROBUSTSE_SKIP_BROWSER=1 and no chromium")
        pytest.fail("chromium is not installed: run `make browser` (Debian package chromium)")
    return exe


def render(chromium: str, page: Path, tmp: Path) -> dict:
    """Load ``page`` in headless Chromium: console lines, image counts and a screenshot."""
    probe = tmp / f"probe-{page.name}"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    env = {**os.environ, "HOME": str(tmp)}  # a throwaway profile, never the user's
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
         f"--window-size={WIDTH},900",
         f"--user-data-dir={tmp / 'profile-dom'}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp / f"{page.stem}.png"
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, "--window-size=1280,2000", f"--user-data-dir={tmp / 'profile-shot'}",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120, env=env, check=True,
    )  # fmt: skip
    images = re.search(r'data-images="(\d+)"', dom.stdout)
    broken = re.search(r'data-broken="(\d+)"', dom.stdout)
    scroll = re.search(r'data-scroll-width="(\d+)"', dom.stdout)
    return {
        "scroll_width": int(scroll.group(1)) if scroll else -1,
        "console": [line for line in dom.stderr.splitlines() if ":CONSOLE" in line],
        "images": int(images.group(1)) if images else -1,
        "broken": int(broken.group(1)) if broken else -1,
        "screenshot": mpimg.imread(shot),
    }


def test_the_browser_check_catches_broken_pages(chromium, tmp_path):
    """Negative control: the same checks flag a console error and an undecodable image."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><p>x</p><img src='data:image/png;base64,AAAA'>"
        "<script>console.error('boom')</script><table><tr><td style='min-width:2000px'>wide</td></tr></table>"
        "</body></html>"
    )
    seen = render(chromium, bad, tmp_path)
    assert any("boom" in line for line in seen["console"])
    assert seen["images"] == 1 and seen["broken"] == 1
    assert seen["scroll_width"] > WIDTH  # a page that scrolls sideways is caught


def test_report_renders_in_headless_chromium(chromium, tiny_run, tmp_path):
    _, out, res = tiny_run
    page = out / "report.html"
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    seen = render(chromium, page, tmp_path)
    assert seen["console"] == []
    assert seen["images"] == 11 and seen["broken"] == 0
    assert 0 < seen["scroll_width"] <= WIDTH  # no horizontal scroll at 1,400 px
    shot = seen["screenshot"][..., :3]
    assert shot.std() > 0.05  # not blank: text, tables and figures
    assert (shot.mean(axis=2) < 0.5).mean() > 0.01  # some dark ink on the page


def test_report_command_regenerates_from_the_store(tiny_run, tmp_path):
    _, out, res = tiny_run
    copy = copy_run(out, tmp_path / "copy")
    result = CliRunner().invoke(cli, ["--quiet", "report", str(copy), "--bootstrap", "300"])
    assert result.exit_code == 0, result.output
    assert "verdict" in result.stdout and "robust_accuracy" in result.stdout
    assert (copy / "report.html").exists() and len(list((copy / "figures").glob("*.png"))) == 11
    md = (copy / "report.md").read_text()
    assert md.startswith("# Does SE gating damp") and "## Sanity checks" in md
    import pandas as pd

    assert pd.read_csv(copy / "stats.csv")[["diff", "ci_low", "ci_high"]].equals(
        res.report.comparison[["diff", "ci_low", "ci_high"]].reset_index(drop=True)
    )


def test_report_without_a_store_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}: no results.db here (run `robustse experiment` or `robustse sweep` first)"
    ]


def _store_with_cells(path: Path, cells: list[tuple[str, str, float]]) -> None:
    """A one-model store with one single-example cell per (attack, norm, eps)."""
    from robustse.core.store import Cell, ResultsStore

    with ResultsStore(path / "results.db") as store:
        store.write_model(
            "m", checkpoint="m", arch="x", n=1, clean_correct=1, zero_grad_fraction=0.0, probability_like=0,
            train_mode_forwards=0,
        )  # fmt: skip
        for attack, norm, eps in cells:
            store.write_cell(Cell("m", attack, f"{attack}-{norm}", norm, eps, 1, 0, 0.1), [(0, 1, 1, 0, 0, 1.0, -1.0)])


def test_report_refuses_a_run_that_mixes_norms(tmp_path):
    _store_with_cells(tmp_path, [("fgsm", "linf", 0.1), ("pgd", "l2", 0.5), ("pgd", "linf", 0.1)])
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}: this run mixes norms (fgsm: linf, pgd: l2/linf); the report compares one norm at a time"
    ]
    assert not (tmp_path / "report.html").exists()


def test_a_control_of_another_norm_is_not_a_mix(tmp_path):
    """Only attacks on the label count: the noise control and the gate probe may use any norm."""
    from robustse.analysis.rundata import load_run

    _store_with_cells(tmp_path, [("fgsm", "linf", 0.1), ("noise", "l2", 0.5), ("gate", "l2", 0.5)])
    data = load_run(tmp_path)
    assert set(data.examples.norm) == {"linf", "l2"}


# --------------------------------------------------------------------------- arms


def test_arms_plan_labels_and_se_only_arms():
    spec = ExperimentSpec(
        seeds=(0, 1),
        models=ModelsConfig(twins=("small_cnn",)),
        arms=(
            ArmConfig(name="std"),
            ArmConfig(name="adv", train={"adv_eps": 0.1}),
            ArmConfig(name="r8", se_options={"reduction": 8}, plain=False),
        ),
    )
    plan = plan_models(spec)
    assert [p.label for p in plan if p.seed == 0] == [
        "small_cnn_std_s0", "se_small_cnn_std_s0", "small_cnn_adv_s0", "se_small_cnn_adv_s0", "se_small_cnn_r8_s0",
    ]  # fmt: skip
    assert len(plan) == 10
    adv = spec.arms[1]
    assert spec.arm_train(adv).adv_eps == 0.1 and spec.arm_train(spec.arms[0]).adv_eps == 0.0
    assert spec.arm_se_options(spec.arms[2]) == {"reduction": 8}
    single = plan_models(ExperimentSpec(seeds=(3,)))
    assert [p.label for p in single] == ["small_cnn_s3", "se_small_cnn_s3"]


@pytest.mark.parametrize(
    "arms, match",
    [
        ([{"name": "a", "plain": False}], "first arm must train its plain twin"),
        ([{"name": "a"}, {"name": "a"}], "arm names must be distinct"),
        ([{"name": "a"}, {"name": "b", "plain": False, "train": {"adv_eps": 0.1}}], "cannot change training"),
        ([{"name": "a", "train": {"epochz": 3}}], r"unknown key 'arms\[0\].train.epochz'"),
        ([{"name": "a", "train": {"adv_eps": 2.0}}], "adv_eps must be in"),
        ([{"name": "a/b"}], "invalid run name"),
    ],
)
def test_bad_arms(arms, match):
    with pytest.raises(SpecError, match=match):
        from_mapping(ExperimentSpec, {"arms": arms, "train": {"epochs": 1}})


def test_shipped_specs_load_and_standard_is_the_real_study():
    from robustse.core.config import load_spec

    root = Path(__file__).parent.parent / "attacks"
    specs = {p.stem: load_spec(p) for p in root.glob("*.toml")}
    assert {"quick", "standard"} <= set(specs)
    std = specs["standard"]
    assert std.models.twins == ("resnet20",) and len(std.seeds) >= 3
    assert std.sweep is not None and (std.sweep.eval_subset or 10**9) >= 10000 and len(std.sweep.epsilons) >= 8
    pgd = [a for a in std.sweep.attacks if a["name"] == "pgd"]
    assert pgd and pgd[0]["steps"] == 20 and pgd[0]["restarts"] >= 2
    aa = [a for a in std.sweep.attacks if a["name"] == "torchattacks:AutoAttack"]
    assert aa and len(aa[0]["only_eps"]) == 1
    reductions = {a.se_options.get("reduction", std.models.se_options.get("reduction")) for a in std.arms}
    assert reductions >= {2, 4, 8, 16}
    assert any(std.arm_train(a).adv_eps > 0 for a in std.arms if a.plain)
    quick = specs["quick"]
    assert len(quick.seeds) >= 2 and quick.sweep is not None and len(quick.sweep.epsilons) >= 5


def test_excitation_heatmaps_name_few_classes_and_index_many():
    """Ten class names label the rows; ImageNet's 1,000 become an index axis (laying out 1,000 tick
    labels per panel took matplotlib about 29 s per figure)."""
    import numpy as np

    from robustse.analysis import plots

    rng = np.random.default_rng(0)
    for k, named in ((10, True), (1000, False)):
        names = [f"class {i}" for i in range(k)]
        fig = plots.excitation_heatmaps([("stage0.se", rng.random((k, 8)), rng.random((k, 8)))], names, 0.01)
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert (labels == names) is named
        assert ("class index" in ax.get_ylabel()) is not named
        assert len(labels) < 50
