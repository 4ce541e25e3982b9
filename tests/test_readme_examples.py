"""README's "Your own model" examples, run from README's own text.

Two changes keep the test fast and are the only ones: the fast twins (``small_cnn`` and
``se_small_cnn``) stand in for ``resnet20`` and ``se_resnet20``, and 40 attacked images stand
in for 1,000. The weights are untrained state dicts saved as the example expects them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _own_model_block(lang: str) -> str:
    """The ```lang block of README's "Your own model" section."""
    section = README.read_text(encoding="utf-8").split("## Your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"README's own-model section should have one {lang} block"
    return blocks[0].replace("resnet20", "small_cnn")


@pytest.fixture
def weights_dir(tmp_path, real_fmnist, monkeypatch):
    """``w/se_s{k}.pth`` and ``w/plain_s{k}.pth`` for k = 0..4 in a fresh working directory."""
    import robustse as rs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    for k in range(5):
        for arch, f in [("se_small_cnn", f"w/se_s{k}.pth"), ("small_cnn", f"w/plain_s{k}.pth")]:
            torch.manual_seed(k)
            torch.save(rs.create_model(arch, num_classes=10, in_channels=1).state_dict(), f)
    return tmp_path


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # robustse's console script sits beside the interpreter
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def test_the_cli_example_pairs_five_seeds_and_writes_the_report(weights_dir):
    script = _own_model_block("sh").replace("--out reports/mine", "--out reports/mine --eval-subset 40")
    assert "--eval-subset 40" in script
    done = subprocess.run(["bash", "-ec", script], capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (weights_dir / "reports/mine/report.html").is_file()
    stats = pd.read_csv(weights_dir / "reports/mine/stats.csv")
    assert set(stats.n_pairs) == {5}  # every SE file met its plain twin of the same seed
    assert "5 seed pairs" in (weights_dir / "reports/mine/report.md").read_text(encoding="utf-8")


def test_the_python_example_prints_the_bottom_line(weights_dir):
    code = _own_model_block("python").replace("SweepConfig(", "SweepConfig(eval_subset=40, ")
    assert "eval_subset=40" in code
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.match(r"(Yes|No|Not settled) — ", done.stdout), done.stdout
    assert len(list((weights_dir / "mine").glob("*.safetensors"))) == 10
    assert (weights_dir / "reports/mine-py/report.html").is_file()
