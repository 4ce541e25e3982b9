"""Sweeps and the results store: cells, resume after SIGKILL, sanity checks, CLI errors."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from robustse.cli import cli, parse_attack, parse_epsilons
from robustse.core.errors import AttackError, StoreError
from robustse.core.store import Cell, ResultsStore
from robustse.data.base import to_float
from robustse.data.datasets import load_dataset
from robustse.experiment.checks import run_checks
from robustse.experiment.sweep import SweepModel, build_attacks, run_sweep

from .test_cli import assert_user_error

EPS = [0.0, 0.02, 0.1]


@pytest.fixture(scope="module")
def evalset(real_fmnist):
    return load_dataset("fashion-mnist", split="test").subset(64, seed=3)


def small_sweep(trained_small, evalset, out, **kw):
    model, _, _, ckpt = trained_small
    attacks = build_attacks([{"name": "fgsm"}, {"name": "pgd", "steps": 3}, {"name": "noise"}], norm="linf", seed=0)
    return run_sweep(
        [SweepModel("se", model, str(ckpt), {"arch": "se_small_cnn"})],
        attacks,
        EPS,
        evalset,
        out,
        batch_size=32,
        progress=False,
        **kw,
    )


def test_sweep_cells_rows_checks_and_resume(tmp_path, trained_small, evalset):
    res = small_sweep(trained_small, evalset, tmp_path)
    assert res.computed_cells == 9 and len(res.cells) == 9
    with sqlite3.connect(tmp_path / "results.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0] == 9 * 64
    lines = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 9 * 64 and lines[0].startswith("model,attack,attack_key,norm,eps,idx,label")
    status = {c.name: c.status for c in res.checks}
    for name in (
        "eps0_equals_clean",
        "perturbation_within_budget",
        "no_nan_inf",
        "eval_mode",
        "outputs_are_logits",
        "nonzero_input_gradients",
        "noise_weaker_than_attack",
    ):
        assert status[name] == "pass", (name, res.checks)
    assert set(status) >= {"accuracy_non_increasing", "pgd_stronger_than_fgsm", "near_chance_at_largest_eps"}
    # eps = 0 reproduces clean accuracy exactly; the worst case is no better than any attack
    cells = res.cells.assign(acc=res.cells.correct / res.cells.n)
    assert cells[cells.eps == 0].acc.nunique() == 1
    for eps in EPS:
        worst = float(res.robust[res.robust.eps == eps].accuracy.iloc[0])
        attacks_here = cells[(cells.eps == eps) & (cells.attack != "noise")]
        assert worst <= attacks_here.acc.min() + 1e-12
        row = res.robust[res.robust.eps == eps].iloc[0]
        assert row.ci_low <= worst <= row.ci_high
    again = small_sweep(trained_small, evalset, tmp_path)
    assert again.computed_cells == 0 and len(again.cells) == 9
    with sqlite3.connect(tmp_path / "results.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0] == 9 * 64


def test_accuracy_only_sweep_matches_definition(tmp_path, trained_small, evalset):
    res = small_sweep(trained_small, evalset, tmp_path, accuracy_only=True)
    ex = ResultsStore(tmp_path / "results.db").examples()
    pgd = ex[ex.attack == "pgd"].pivot(index="idx", columns="eps", values="correct")
    assert ((pgd[0.1] <= pgd[0.02]) & (pgd[0.02] <= pgd[0.0])).all()  # survivors only shrink
    assert res.computed_cells == 9


def test_probability_outputs_fail_the_logits_check(tmp_path, trained_small, evalset):
    model, _, _, ckpt = trained_small
    probs = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
    res = run_sweep(
        [SweepModel("p", probs, str(ckpt))],
        build_attacks([{"name": "fgsm"}], norm="linf", seed=0, noise=False),
        [0.0, 0.05],
        evalset,
        tmp_path,
        progress=False,
    )
    assert {c.name: c.status for c in res.checks}["outputs_are_logits"] == "fail"


def test_budget_violation_is_caught(tmp_path):
    with ResultsStore(tmp_path / "r.db") as store:
        store.write_model(
            "m",
            checkpoint="m",
            arch="x",
            n=1,
            clean_correct=1,
            zero_grad_fraction=0.0,
            probability_like=0,
            train_mode_forwards=0,
        )
        for eps, linf in ((0.0, 0.0), (0.1, 0.2)):
            store.write_cell(
                Cell("m", "pgd", "k", "linf", eps, 1, 1, 0.1, max_linf=linf, max_l2=0.0, min_pixel=0.0, max_pixel=1.0),
                [(0, 1, 1, 1, 1, 2.0, 2.0)],
            )
        status = {c.name: c.status for c in run_checks(store, num_classes=10)}
    assert status["perturbation_within_budget"] == "fail"
    assert status["near_chance_at_largest_eps"] == "warn"


def test_corrupt_or_foreign_store_is_reported_not_overwritten(tmp_path):
    bad = tmp_path / "results.db"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    before = bad.read_bytes()
    with pytest.raises(StoreError, match="corrupt or foreign results database"):
        ResultsStore(bad)
    assert bad.read_bytes() == before
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="schema None"):
        ResultsStore(other)


def test_duplicate_cells_are_impossible(tmp_path):
    with ResultsStore(tmp_path / "r.db") as store:
        cell = Cell("m", "fgsm", "k", "linf", 0.1, 1, 0, 0.1)
        assert store.write_cell(cell, [(0, 1, 1, 0, 0, 1.0, -1.0)])
        assert not store.write_cell(cell, [(0, 1, 1, 0, 0, 1.0, -1.0)])  # finished elsewhere: it stands
        with pytest.raises(sqlite3.IntegrityError), store.conn:  # and the schema forbids a second copy
            store.conn.execute("INSERT INTO cells (model, attack, attack_key, norm, eps, n, correct, status, seconds)"
                               " VALUES ('m', 'fgsm', 'k', 'linf', 0.1, 1, 0, 'done', 0.1)")  # fmt: skip
        assert len(store.examples()) == 1  # nothing was added


def test_killed_sweep_resumes_with_exact_cells(tmp_path, trained_small):
    _, _, _, ckpt = trained_small
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "robustse.cli",
        "--quiet",
        "sweep",
        str(ckpt),
        "--out",
        str(out),
        "--eval-subset",
        "300",
        "--batch-size",
        "100",
        "--eps",
        "0,0.01,0.03",
        "--attack",
        "fgsm",
        "--attack",
        "pgd(steps=30)",
        "--attack",
        "pgd(steps=31)",
        "--attack",
        "noise",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = out / "results.db"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    done = conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
            except sqlite3.OperationalError:
                done = 0
            if done >= 3:  # the FGSM ladder is in; PGD is running
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    with sqlite3.connect(db) as conn:
        cells_before = conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
        rows_before = conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
    assert 3 <= cells_before < 12 and rows_before == cells_before * 300  # whole cells only
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({12 - cells_before} new cells)" in rerun.stdout
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 12
        assert conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0] == 12 * 300
        dup = conn.execute("SELECT COUNT(*) FROM (SELECT cell_id, idx FROM examples GROUP BY 1, 2 HAVING COUNT(*) > 1)")
        assert dup.fetchone()[0] == 0


def test_parse_attack_and_epsilons():
    assert parse_attack("fgsm") == {"name": "fgsm"}
    assert parse_attack("pgd(steps=20, restarts=2, random_start=true, norm=l2)") == {
        "name": "pgd",
        "steps": 20,
        "restarts": 2,
        "random_start": True,
        "norm": "l2",
    }
    assert parse_attack("torchattacks:APGD(loss='ce')") == {"name": "torchattacks:APGD", "loss": "ce"}
    assert parse_epsilons("0,0.01,0.03") == (0.0, 0.01, 0.03)
    assert parse_epsilons("0:0.03:0.01") == (0.0, 0.01, 0.02, 0.03)
    with pytest.raises(AttackError, match="not key=value"):
        parse_attack("pgd(steps)")
    with pytest.raises(AttackError, match="expected numbers"):
        parse_epsilons("a,b")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--eps", "-0.1"], "sweep.epsilons: -0.1 < 0"),
        (["--eps", "0,1.5"], "sweep.epsilons: 1.5 is outside [0, 1]"),
        (["--attack", "pgd(steps=0)"], "steps must be an integer in [1, 10,000]"),
        (["--attack", "cw"], "unknown attack 'cw' (valid: fgsm, gate, noise, pgd, or torchattacks:<Name>)"),
        (["--attack", "pgd(norm=l3)"], "unknown norm 'l3' (valid: linf, l2)"),
        (["--norm", "l3"], "'l3' is not one of 'linf', 'l2'"),
        (["--attack", "torchattacks:Nope"], "unknown torchattacks attack 'Nope'"),
    ],
)
def test_sweep_bad_input(tmp_path, trained_small, args, needle):
    _, _, _, ckpt = trained_small
    res = CliRunner().invoke(cli, ["sweep", str(ckpt), "--out", str(tmp_path / "o"), *args], catch_exceptions=False)
    assert_user_error(res, needle)
    assert not (tmp_path / "o" / "results.db").exists()


def test_sweep_bad_spec_and_missing_checkpoint(tmp_path, trained_small):
    spec = tmp_path / "s.toml"
    spec.write_text("[sweep]\nepsilon = [0.1]\n")
    res = CliRunner().invoke(cli, ["sweep", "--spec", str(spec)], catch_exceptions=False)
    assert_user_error(res, "unknown key 'sweep.epsilon'", "epsilons")
    res = CliRunner().invoke(cli, ["sweep", str(tmp_path / "none.safetensors")], catch_exceptions=False)
    assert_user_error(res, "checkpoint not found")
    res = CliRunner().invoke(cli, ["sweep"], catch_exceptions=False)
    assert_user_error(res, "no models")


def test_sweep_cli_summary_and_strict(tmp_path, trained_small):
    _, _, _, ckpt = trained_small
    args = [
        "--quiet",
        "sweep",
        str(ckpt),
        "--out",
        str(tmp_path / "o"),
        "--eval-subset",
        "32",
        "--eps",
        "0,0.05",
        "--attack",
        "fgsm",
        "--attack",
        "noise",
        "--strict",
    ]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "robust accuracy" in res.stdout and "PASS" in res.stdout and "eps0_equals_clean" in res.stdout
    # the same run directory in the other memory layout: refused, results kept
    before = (tmp_path / "o" / "results.db").read_bytes()
    other = CliRunner().invoke(cli, [*args, "--channels-last"])
    assert_user_error(other, "different memory layout (--channels-last)")
    assert (tmp_path / "o" / "results.db").read_bytes() == before
    attacks = CliRunner().invoke(cli, ["attacks"])
    assert attacks.exit_code == 0 and "restarts" in attacks.stdout and "torchattacks:<Name>" in attacks.stdout


def test_fgsm_sweep_takes_one_gradient_per_batch(tmp_path, trained_small, evalset):
    model, _, _, ckpt = trained_small
    grads = []
    handle = model.register_forward_pre_hook(
        lambda m, inp: grads.append(torch.is_grad_enabled() and inp[0].requires_grad)
    )
    try:
        res = run_sweep(
            [SweepModel("m", model, str(ckpt))],
            build_attacks([{"name": "fgsm"}], norm="linf", seed=0, noise=False),
            [0.0, 0.01, 0.02, 0.05, 0.1],
            evalset,
            tmp_path,
            batch_size=32,
            progress=False,
        )
    finally:
        handle.remove()
    assert res.computed_cells == 5
    # 64 examples in 2 batches: one gradient pass of the model each, for FGSM's whole ladder (the
    # clean pass's zero-gradient check differentiates the evaluator's copy, not the model)
    assert sum(grads) == 2


def test_accuracy_only_resume_equals_a_fresh_run(tmp_path, trained_small, evalset):
    a, b = tmp_path / "a", tmp_path / "b"
    model, _, _, ckpt = trained_small
    sm = [SweepModel("m", model, str(ckpt))]

    def sweep(out, eps):
        attacks = build_attacks([{"name": "pgd", "steps": 4}], norm="linf", seed=1, noise=False)
        return run_sweep(sm, attacks, eps, evalset, out, batch_size=32, accuracy_only=True, progress=False)

    sweep(a, [0.0, 0.02])
    assert sweep(a, [0.0, 0.02, 0.1]).computed_cells == 1  # the 0.1 rung starts from the stored survivors
    sweep(b, [0.0, 0.02, 0.1])
    ex_a, ex_b = ResultsStore(a / "results.db").examples(), ResultsStore(b / "results.db").examples()
    cols = ["eps", "idx", "correct", "adv_pred"]
    assert ex_a[cols].reset_index(drop=True).equals(ex_b[cols].reset_index(drop=True))


def test_sweep_foreign_weights_of_a_registry_architecture(tmp_path, trained_small):
    model, _, _, ckpt = trained_small
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    args = [
        "--quiet",
        "sweep",
        str(ckpt),
        f"se_small_cnn={weights}",
        "--out",
        str(tmp_path / "o"),
        "--eval-subset",
        "32",
        "--eps",
        "0,0.03",
        "--attack",
        "fgsm",
        "--json",
    ]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    import json

    robust = json.loads(res.stdout)["result"]["robust"]
    by_model = {(r["model"], r["eps"]): r["accuracy"] for r in robust}
    stem = ckpt.name.removesuffix(".safetensors")
    assert {m for m, _ in by_model} == {stem, "se_small_cnn@w"}
    for eps in (0.0, 0.03):  # the same weights give the same robust accuracy
        assert by_model[(stem, eps)] == by_model[("se_small_cnn@w", eps)]


def test_store_refuses_another_evaluation_set(tmp_path, trained_small, evalset):
    small_sweep(trained_small, evalset, tmp_path)
    other = load_dataset("fashion-mnist", split="test").subset(40, seed=3)
    with pytest.raises(StoreError, match="different evaluation set"):
        small_sweep(trained_small, other, tmp_path)
    with pytest.raises(StoreError, match=r"different mode \(--accuracy-only\)"):
        small_sweep(trained_small, evalset, tmp_path, accuracy_only=True)
    assert len(ResultsStore(tmp_path / "results.db").cells()) == 9  # nothing lost


def test_channels_last_sweep(tmp_path, trained_small, evalset):
    model = trained_small[0]
    strides = [p.stride() for p in model.parameters()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ref = small_sweep(trained_small, evalset, tmp_path / "ref")
    res = small_sweep(trained_small, evalset, tmp_path / "cl", channels_last=True)
    assert [p.stride() for p in model.parameters()] == strides  # the weights' own layout is restored
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(c.status != "fail" for c in res.checks)
    a = ResultsStore(tmp_path / "ref" / "results.db").examples().set_index(["attack", "eps", "idx"]).sort_index()
    b = ResultsStore(tmp_path / "cl" / "results.db").examples().set_index(["attack", "eps", "idx"]).sort_index()
    assert (a.clean_pred == b.clean_pred).all()  # predictions come from the same evaluator
    for key in [("fgsm", 0.0), ("pgd", 0.0), ("noise", 0.02), ("noise", 0.1)]:  # no gradient involved
        assert (a.loc[key].adv_pred == b.loc[key].adv_pred).all(), key
    # gradient attacks: the same function up to float rounding, so nearly every prediction agrees
    assert (a.adv_pred == b.adv_pred).mean() >= 0.95
    assert abs(ref.robust.accuracy.to_numpy() - res.robust.accuracy.to_numpy()).max() <= 0.05
    with pytest.raises(StoreError, match=r"different memory layout \(--channels-last\)"):
        small_sweep(trained_small, evalset, tmp_path / "cl")  # a store holds one layout's results


def test_a_store_from_before_the_eval_copy_is_refused_and_exact_cells_are_their_own(tmp_path, trained_small, evalset):
    small_sweep(trained_small, evalset, tmp_path)
    with sqlite3.connect(tmp_path / "results.db") as conn:  # as a store written before the key existed
        conn.execute("DELETE FROM meta WHERE key = 'gradients'")
    with pytest.raises(StoreError, match=r"different attack gradient path \(cells from before the eval-mode copy\)"):
        small_sweep(trained_small, evalset, tmp_path)
    assert len(ResultsStore(tmp_path / "results.db").cells()) == 9  # nothing lost
    model, _, _, ckpt = trained_small
    attacks = build_attacks([{"name": "fgsm"}, {"name": "fgsm", "exact": True}], norm="linf", seed=0, noise=False)
    res = run_sweep([SweepModel("m", model, str(ckpt))], attacks, [0.0, 0.05], evalset, tmp_path / "both",
                    progress=False)  # fmt: skip
    assert len(res.cells) == 4  # the exact attack's cells beside the default's, both kept


def test_changed_weights_recompute_their_cells(tmp_path, trained_small, evalset):
    import copy

    model, _, _, ckpt = trained_small
    attacks = build_attacks([{"name": "fgsm"}], norm="linf", seed=0, noise=False)
    first = run_sweep([SweepModel("m", model, str(ckpt))], attacks, [0.0, 0.05], evalset, tmp_path, progress=False)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head.bias.add_(0.5)
    lines = []
    again = run_sweep(
        [SweepModel("m", changed, str(ckpt))], attacks, [0.0, 0.05], evalset, tmp_path, progress=False, log=lines.append
    )
    assert first.computed_cells == again.computed_cells == 2
    assert any("weights changed" in m for m in lines)
    assert len(ResultsStore(tmp_path / "results.db").cells()) == 2


def test_sweep_reports_only_its_own_attacks(tmp_path, trained_small, evalset):
    small_sweep(trained_small, evalset, tmp_path)  # fgsm, pgd, noise
    model, _, _, ckpt = trained_small
    res = run_sweep(
        [SweepModel("se", model, str(ckpt))],
        build_attacks([{"name": "fgsm"}], norm="linf", seed=0, noise=False),
        EPS,
        evalset,
        tmp_path,
        batch_size=32,
        progress=False,
    )
    assert res.computed_cells == 0 and set(res.cells.attack) == {"fgsm"}
    fgsm = res.cells.set_index("eps").correct / 64
    for eps in EPS:  # the worst case is FGSM's own accuracy, not the stored PGD's
        assert float(res.robust[res.robust.eps == eps].accuracy.iloc[0]) == pytest.approx(float(fgsm[eps]))


def test_torchattacks_l2_attack_keeps_its_norm():
    atk = build_attacks([{"name": "torchattacks:PGDL2", "steps": 2}], norm="linf", seed=0)[0]
    assert atk.norm == "l2"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("pgd(seed=abc)", "seed must be an integer"),
        ("noise(seed=1.5)", "seed must be an integer"),
        ("pgd(random_start='no')", "random_start must be true or false"),
        ("pgd(steps=true)", "steps must be an integer"),
        ("pgd(abs_stepsize=true)", "abs_stepsize must be a number"),
        ("torchattacks:PGD(steps='x')", "option steps must be an integer"),
    ],
)
def test_bad_attack_option_values(tmp_path, trained_small, text, needle):
    _, _, _, ckpt = trained_small
    res = CliRunner().invoke(
        cli, ["sweep", str(ckpt), "--out", str(tmp_path / "o"), "--attack", text], catch_exceptions=False
    )
    assert_user_error(res, needle)


def test_bad_glob_and_no_eps_zero(tmp_path, trained_small, evalset):
    res = CliRunner().invoke(cli, ["sweep", str(tmp_path / "**x" / "*.safetensors")], catch_exceptions=False)
    assert_user_error(res, "bad checkpoint pattern")
    model, _, _, ckpt = trained_small
    out = run_sweep(
        [SweepModel("m", model, str(ckpt))],
        build_attacks([{"name": "fgsm"}], norm="linf", seed=0, noise=False),
        [0.05],
        evalset,
        tmp_path,
        progress=False,
    )
    assert {c.name: c.status for c in out.checks}["eps0_equals_clean"] == "warn"


def test_pass_rows_gives_the_same_cells_and_probes_in_smaller_passes(tmp_path, trained_small, evalset):
    """Gradients and probe passes taken 5 rows at a time (memory follows pass_rows, not the
    batch): the same predictions and, up to float rounding, the same margins and site values."""
    import robustse.attacks.base as A

    whole = small_sweep(trained_small, evalset, tmp_path / "whole")
    seen: list[int] = []
    grad = A._chunk_grad

    def spy(model, x, y, batch):  # type: ignore[no-untyped-def]
        seen.append(x.shape[0])
        return grad(model, x, y, batch)

    A._chunk_grad = spy  # type: ignore[assignment]
    try:
        parts = small_sweep(trained_small, evalset, tmp_path / "parts", pass_rows=5)
    finally:
        A._chunk_grad = grad  # type: ignore[assignment]
    assert seen and max(seen) == 5  # no gradient pass saw more than 5 rows
    a, b = (ResultsStore(d / "results.db") for d in (tmp_path / "whole", tmp_path / "parts"))
    ea, eb = a.examples(), b.examples()
    assert (ea.adv_pred == eb.adv_pred).mean() > 0.99  # a rounding-level change may flip a knife-edge row
    assert torch.allclose(torch.tensor(ea.adv_margin.to_numpy()), torch.tensor(eb.adv_margin.to_numpy()), atol=1e-3)
    sa, sb = a.probe_table("sites"), b.probe_table("sites")
    assert len(sa) == len(sb) > 0
    ma, mb = (torch.tensor(t["mean"].to_numpy()) for t in (sa, sb))
    assert torch.allclose(ma, mb, rtol=1e-3, atol=1e-5, equal_nan=True)
    assert len(whole.cells) == len(parts.cells)


def test_pass_budget_sets_the_rows_of_a_gradient_pass(tmp_path, trained_small, evalset, monkeypatch):
    """With no pass_rows, a gradient pass takes as many rows as the device's budget holds: a
    budget of 6 rows' autograd graph gives passes of 6 rows and says so once; the default holds a batch."""
    import robustse.attacks.base as A
    import robustse.attacks.evaluator as AE
    import robustse.core.passes as PS

    model = trained_small[0]
    per_row = AE.grad_bytes_per_row(model, to_float(evalset.x[:2]))
    monkeypatch.setattr(PS, "CPU_PASS_MEMORY", 6 * per_row + per_row // 2)
    seen: list[int] = []
    grad = A._chunk_grad
    monkeypatch.setattr(A, "_chunk_grad", lambda m, x, y, b: seen.append(len(x)) or grad(m, x, y, b))
    lines: list[str] = []
    small_sweep(trained_small, evalset, tmp_path / "budget", log=lines.append)
    assert max(seen) == 6 and 6 in seen
    assert sum("take 6 rows at a time" in line for line in lines) == 1
    monkeypatch.undo()  # the default budget: a 32-row batch of this model fits
    monkeypatch.setattr(A, "_chunk_grad", lambda m, x, y, b: seen.append(len(x)) or grad(m, x, y, b))
    seen.clear()
    small_sweep(trained_small, evalset, tmp_path / "whole", log=lines.append)
    assert max(seen) == 32


def test_grad_bytes_per_row_counts_activations_not_weights():
    """The autograd graph of an input-gradient pass, per row: each exp layer saves its output (one
    image's worth of float32 per row), the weights (held anyway) are not counted, and what does
    not grow with the batch is not per row."""
    from robustse.attacks.evaluator import grad_bytes_per_row

    class Exp(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.exp()

    def net(layers: int) -> torch.nn.Module:
        return torch.nn.Sequential(
            *[Exp() for _ in range(layers)], torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10)
        )

    x, image = torch.rand(2, 3, 16, 16), 3 * 16 * 16 * 4
    one, three = grad_bytes_per_row(net(1), x), grad_bytes_per_row(net(3), x)
    assert three - one == 2 * image  # two more saved outputs, a row's worth each
    assert image <= one <= image + 200  # the exp output (the linear layer saves the same storage), the loss's few bytes

    class Square(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x  # saves its input (the image) for backward

    square = torch.nn.Sequential(Square(), torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    assert image <= grad_bytes_per_row(square, x) <= image + 200  # the input it saves: a row's worth per row
    heavy = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4096), torch.nn.Linear(4096, 4096))
    assert grad_bytes_per_row(heavy, torch.rand(2, 3, 2, 2)) < 100_000  # 64 MiB of weights not counted


def test_held_gates_in_smaller_passes_hold_each_row_at_its_own_clean_gates(tmp_path, trained_small, evalset):
    """The held_gates intervention keeps the whole batch's clean gates; a pass of 5 rows (pass_rows,
    or the default budget on large images) uses those rows' gates: the same cells as whole batches."""
    from robustse.experiment.setup import intervention_models

    model, _, _, ckpt = trained_small
    base = SweepModel("se", model, str(ckpt), {"arch": "se_small_cnn"})
    models = [base, *intervention_models([base], ["held_gates"])]
    attacks = build_attacks([{"name": "pgd", "steps": 3}], norm="linf", seed=0, noise=False)
    for out, rows in ((tmp_path / "whole", None), (tmp_path / "parts", 5)):
        run_sweep(models, attacks, EPS, evalset, out, batch_size=32, progress=False, pass_rows=rows)
    a, b = (ResultsStore(d / "results.db").examples() for d in (tmp_path / "whole", tmp_path / "parts"))
    a, b = (t[t.model == "se@held_gates"].sort_values(["eps", "idx"]) for t in (a, b))
    assert len(a) == len(b) == 64 * len(EPS)
    assert (a.adv_pred.to_numpy() == b.adv_pred.to_numpy()).mean() > 0.99
    assert torch.allclose(torch.tensor(a.adv_margin.to_numpy()), torch.tensor(b.adv_margin.to_numpy()), atol=1e-3)


def test_evalset_fingerprint_is_the_hash_of_the_whole_set_taken_a_chunk_at_a_time(evalset, monkeypatch):
    """The store's identity of an evaluation set: the same digest whether the images are hashed
    whole or a few rows at a time (a large set is never copied whole), and one pixel changes it."""
    import dataclasses
    import hashlib

    import robustse.experiment.sweep as S

    whole = hashlib.sha256(f"{evalset.name}|{evalset.split}|{tuple(evalset.x.shape)}|".encode())
    whole.update(evalset.x.numpy().tobytes())
    whole.update(evalset.y.numpy().tobytes())
    monkeypatch.setattr(S, "FINGERPRINT_CHUNK", 3 * evalset.x[:1].numel())  # 3 rows at a time
    assert S.evalset_fingerprint(evalset) == whole.hexdigest()
    x = evalset.x.clone()
    x[40, 0, 5, 5] ^= 1
    assert S.evalset_fingerprint(dataclasses.replace(evalset, x=x)) != whole.hexdigest()


def test_a_held_intervention_refuses_passes_that_are_not_its_batch(tmp_path, trained_small, evalset):
    """held_gates pins each row of its batch to that row's clean gates: a pass of other rows (a
    subset of survivors, cut into parts or not) cannot be matched and is refused, never given
    another row's gates; so accuracy_only (survivors only) is refused for an intervention."""
    from robustse.attacks import create_attack
    from robustse.attacks.base import input_grad as _input_grad
    from robustse.core.errors import SpecError
    from robustse.core.passes import pass_rows, rows_for_pass, rows_of_pass
    from robustse.experiment.setup import intervention_models
    from robustse.probes.capture import held_gates

    v = torch.arange(8.0)[:, None]
    with rows_of_pass(slice(4, 8), 8):
        assert torch.equal(rows_for_pass(v, 4), v[4:])
    with rows_of_pass(slice(0, 4), 6), pytest.raises(ValueError, match="held for 8 rows"):
        rows_for_pass(v, 4)  # a part of 6 survivors: not rows of the held batch
    model, x = trained_small[0], to_float(evalset.x[:8])
    y = model(x).argmax(1)
    with held_gates(model, x), pass_rows(3):
        _input_grad(model, x, y, 8)  # the held batch in parts of 3: fine
        with pytest.raises(ValueError, match="row for row"):
            _input_grad(model, x[:5], y[:5], 5)
    pgd = create_attack("pgd", steps=2, random_start=False)  # two eps stacked: 16 rows, each held row twice
    with held_gates(model, x):
        alone = [pgd(model, x, y, epsilons=[e]).adversarials[0] for e in (0.01, 0.03)]
        for rows in (None, 3, 8):
            with pass_rows(rows):
                together = pgd(model, x, y, epsilons=[0.01, 0.03]).adversarials
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(alone, together, strict=True)), rows
    base = SweepModel("se", model, str(trained_small[3]), {"arch": "se_small_cnn"})
    models = [base, *intervention_models([base], ["held_gates"])]
    attacks = build_attacks([{"name": "fgsm"}], norm="linf", seed=0, noise=False)
    with pytest.raises(SpecError, match="se@held_gates: a gate intervention cannot run with accuracy_only"):
        run_sweep(models, attacks, EPS, evalset, tmp_path / "acc", accuracy_only=True, progress=False)
    assert not (tmp_path / "acc").exists()
    from robustse.models.checkpoint import read_metadata

    base = SweepModel("se", model, str(trained_small[3]), read_metadata(trained_small[3]))
    frozen = intervention_models([base], ["frozen_mean"])  # the same means for every row: survivors are fine
    run_sweep([base, *frozen], attacks, EPS, evalset, tmp_path / "frozen", accuracy_only=True, progress=False)
    cells = ResultsStore(tmp_path / "frozen" / "results.db").cells()
    assert set(cells.model) == {"se", "se@frozen_mean"} and len(cells) == 2 * len(EPS)


def test_held_gates_work_under_inference_mode(trained_small, evalset):
    """An attack inside inference_mode gets the same adversarials as outside, also with its gates
    held (the held values are taken as normal tensors, which the attack's passes may save)."""
    from robustse.attacks import create_attack
    from robustse.probes.capture import held_gates

    model, x = trained_small[0], to_float(evalset.x[:8])
    y = evalset.y[:8]
    pgd = create_attack("pgd", steps=2, seed=0)
    with torch.no_grad(), held_gates(model, x):
        outside = pgd(model, x, y, epsilons=[0.03]).adversarials[0]
    with torch.inference_mode(), held_gates(model, x):
        inside = pgd(model, x, y, epsilons=[0.03]).adversarials[0]
    assert torch.equal(inside, outside)
