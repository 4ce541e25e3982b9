"""The package's architecture (README "Architecture"): the import-linter contracts hold (layers,
no cycles between a folder's modules, no torch in the analysis), and the analysis, `robustse
--help` and `robustse report` run where torch cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import copy_run

ROOT = Path(__file__).resolve().parents[1]
BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "torchattacks"):
            raise ImportError(f"torch is blocked here ({name})")
sys.meta_path.insert(0, NoTorch())
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code, *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "3 kept, 0 broken" in res.stdout


def test_the_block_really_blocks_torch():
    res = _python("import torch")
    assert res.returncode != 0 and "torch is blocked here" in res.stderr


def test_analysis_and_help_run_without_torch():
    code = """
import robustse
import robustse.analysis.answer, robustse.analysis.ratios, robustse.analysis.report, robustse.analysis.stats
from robustse.cli import cli
cli(["--help"])
"""
    res = _python(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "report" in res.stdout and "sweep" in res.stdout


def test_report_of_an_experiment_runs_without_torch(tiny_run, tmp_path):

    _, out, _ = tiny_run
    run = copy_run(out, tmp_path / "run")
    res = _python("from robustse.cli import main; sys.argv = ['robustse', '--quiet', 'report', sys.argv[1], "
                  "'--bootstrap', '100']; main()", str(run))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "report.html").stat().st_size > 0
