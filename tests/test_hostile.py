"""Hostile inputs (README "Reliability"): a rejected command never loses or changes results, every
option is honoured or refused, and a cell's randomness depends only on what the cell is."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import robustse as rs
from robustse.cli import cli


def _cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _cells(run: Path) -> list[tuple]:  # type: ignore[type-arg]
    """Every stored cell and the number of per-example rows: what a rejected command must leave alone."""
    with sqlite3.connect(run / "results.db") as conn:
        cells = conn.execute("SELECT model, attack_key, eps, correct, status FROM cells ORDER BY 1, 2, 3").fetchall()
        (rows,) = conn.execute("SELECT COUNT(*) FROM examples").fetchone()
    return [*cells, rows]


def _assert_refused(res, needle: str) -> None:  # type: ignore[no-untyped-def]
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_changed_weights_keep_their_cells_until_a_command_is_accepted(trained_small, tmp_path):
    """Item 1: the same file name with new weights used to drop the finished cells before a later
    check refused the command."""
    _, _, _, ckpt = trained_small
    model = tmp_path / "m.safetensors"
    shutil.copy(ckpt, model)
    run = tmp_path / "run"
    base = ["--quiet", "sweep", str(model), "--eval-subset", "40", "--out", str(run)]
    assert _cli(*base, "--attack", "fgsm", "--attack", "pgd(steps=2)", "--eps", "0,0.05").exit_code == 0
    before = _cells(run)
    torch.manual_seed(123)
    rs.save_checkpoint(rs.create_model("se_small_cnn"), model)  # retrained under the same name
    _assert_refused(_cli(*base, "--attack", "fgsm", "--eps", "0,nan"), "nan")
    refused = _cli(*base, "--attack", "torchattacks:PGD(steps=1.5)", "--eps", "0,0.05")
    _assert_refused(refused, "steps must be an integer")
    assert _cells(run) == before
    res = _cli(*base, "--attack", "fgsm", "--attack", "pgd(steps=2)", "--eps", "0,0.05")  # accepted: replaced
    assert res.exit_code == 0, res.output
    after = _cells(run)
    assert len(after) == len(before) and after != before


def test_apgd_takes_the_sweeps_norm_and_seed(trained_small):
    """Item 3: APGD(norm=l2) used to run APGD's default Linf attack, and norm=L2 was refused."""
    model, x, y, _ = trained_small
    for norm in ("l2", "L2"):
        atk = rs.create_attack("torchattacks:APGD", norm=norm, steps=3)
        assert atk.norm == "l2"
        delta = (atk(model, x[:16], y[:16], epsilons=[0.5]).adversarials[0] - x[:16]).flatten(1)
        assert float(delta.norm(dim=1).max()) <= 0.5 + 1e-4
        assert float(delta.abs().amax()) < 0.5  # an Linf attack at 0.5 would move pixels by 0.5
    a1 = rs.create_attack("torchattacks:APGD", steps=2, seed=1)
    a2 = rs.create_attack("torchattacks:APGD", steps=2, seed=2)
    assert a1.describe() != a2.describe() and a1._shared["seed"] == 1  # the seed reaches APGD's own


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("torchattacks:PGD(steps=1.5)", "option steps must be an integer (default 10), got 1.5"),
        ("torchattacks:APGD(verbose=yes)", "option verbose must be true or false"),
        ("torchattacks:FAB(eta=nan)", "option eta must be a finite number"),
    ],
)
def test_torchattacks_options_of_the_wrong_type_are_refused_up_front(text, needle):
    from robustse.cli import parse_attack
    from robustse.core.errors import AttackError

    with pytest.raises(AttackError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        spec = parse_attack(text)
        rs.create_attack(spec.pop("name"), **spec)


def test_a_cells_random_starts_do_not_depend_on_the_rest_of_the_ladder(trained_small, tmp_path):
    """Item 4: growing a ladder on rerun gave different PGD/noise results at the same eps than a
    fresh run of the final command."""
    _, _, _, ckpt = trained_small
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    common = ["--quiet", "sweep", str(ckpt), "--attack", "pgd(steps=2)", "--eval-subset", "40", "--batch-size", "16"]
    assert _cli(*common, "--eps", "0,0.05", "--out", str(grown)).exit_code == 0
    assert _cli(*common, "--eps", "0,0.02,0.05", "--out", str(grown)).exit_code == 0
    assert _cli(*common, "--eps", "0,0.02,0.05", "--out", str(fresh)).exit_code == 0
    from robustse.core.store import ResultsStore

    a, b = (ResultsStore(d / "results.db").examples() for d in (grown, fresh))
    cols = ["attack", "eps", "idx", "adv_pred", "adv_margin"]
    key = ["attack", "eps", "idx"]
    assert a[cols].sort_values(key).reset_index(drop=True).equals(b[cols].sort_values(key).reset_index(drop=True))


def test_a_rejected_experiment_leaves_the_runs_spec_alone(tiny_run, tmp_path):
    """Item 2: a rejected experiment used to rewrite spec.toml, so the next report used its settings."""
    spec, out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    kept = (run / "spec.toml").read_text()
    import tomllib

    from robustse.core.config import dump_toml

    data = tomllib.loads(kept)
    data["report"]["alpha"] = 0.2  # what the next report would silently use
    data["sweep"]["attacks"] = [*data["sweep"]["attacks"], {"name": "pgd", "steps": 1.5}]  # refused
    bad = dump_toml(data)
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    res = _cli("experiment", "--spec", str(path), "--out", str(run))
    assert res.exit_code == 2, res.output
    assert (run / "spec.toml").read_text() == kept


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", ["fgsm", "pgd", "gate", "torchattacks:PGD"])
def test_attacks_work_inside_no_grad_and_inference_mode(trained_small, context, name):
    """Item 8: the usual evaluation pattern failed with "element 0 of tensors does not require grad"."""
    model, x, y, _ = trained_small
    atk = rs.create_attack(name, steps=2) if name != "fgsm" else rs.create_attack(name)
    expected = atk(model, x[:8], y[:8], epsilons=[0.05]).adversarials[0]
    with getattr(torch, context)():
        xs, ys = x[:8].clone(), y[:8].clone()  # made inside: inference tensors under inference_mode
        adv = atk(model, xs, ys, epsilons=[0.05]).adversarials[0]
    assert torch.equal(adv, expected) and not adv.requires_grad


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda x, y: (x, y.float()), "labels must be integers"),
        (lambda x, y: (x, y + 10), "a label is out of range"),
        (lambda x, y: (x, y[:-1]), "one label per input"),
        (lambda x, y: (x[:0], y[:0]), "non-empty batch"),
        (lambda x, y: (x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y), "NaN or infinite"),
        (lambda x, y: ((x * 255).to(torch.uint8), y), "divide uint8 images by 255"),
    ],
)
def test_bad_batches_raise_attack_errors_not_raw_exceptions(trained_small, change, needle):
    from robustse.core.errors import AttackError

    model, x, y, _ = trained_small
    xb, yb = change(x[:8], y[:8])
    with pytest.raises(AttackError, match=needle):
        rs.create_attack("pgd", steps=2)(model, xb, yb, epsilons=[0.05])


def test_scalar_epsilons_and_bad_model_sizes_raise_robustse_errors(trained_small):
    from robustse.core.errors import AttackError, ModelError

    model, x, y, _ = trained_small
    with pytest.raises(AttackError, match="epsilons must be a list"):
        rs.create_attack("fgsm")(model, x[:4], y[:4], epsilons=0.03)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="num_classes must be an integer in"):
        rs.create_model("small_cnn", num_classes=-1)
    with pytest.raises(ModelError, match="in_channels must be an integer in"):
        rs.create_model("small_cnn", in_channels=10**9)


def test_ctrl_c_says_interrupted_and_exits_130(trained_small, tmp_path):
    """Item 9: Ctrl-C printed a blank line and "error: aborted" with exit 1."""
    import signal
    import subprocess
    import sys
    import time

    _, _, _, ckpt = trained_small
    db = tmp_path / "run" / "results.db"
    cmd = [sys.executable, "-m", "robustse.cli", "--quiet", "sweep", str(ckpt), "--attack", "pgd(steps=200)",
           "--eps", "0,0.01,0.02,0.03", "--eval-subset", "300", "--out", str(db.parent)]  # fmt: skip
    # a background job (CI) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=restore)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not _has_cells(db):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err == "error: interrupted (finished work is saved; rerun the same command to resume)\n"


def _has_cells(db: Path) -> bool:
    if not db.exists():
        return False
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0] > 0
    except sqlite3.OperationalError:
        return False


def test_results_csv_symlink_is_replaced_not_followed(trained_small, tmp_path):
    """Item 9: a pre-existing symlink at results.csv was followed and its target overwritten."""
    _, _, _, ckpt = trained_small
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (run / "results.csv").symlink_to(victim)
    res = _cli("--quiet", "sweep", str(ckpt), "--attack", "fgsm", "--eps", "0,0.05", "--eval-subset", "20",
               "--out", str(run))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert victim.read_text() == "keep me"
    assert not (run / "results.csv").is_symlink() and (run / "results.csv").read_text().startswith("model,")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[train]\nlr = inf\n", "train.lr must be a finite number > 0 (got inf)"),
        ("[train]\nweight_decay = nan\n", "train.weight_decay must be a finite number >= 0 (got nan)"),
        ('name = "a\\nb"\n', "invalid run name"),
    ],
)
def test_spec_values_that_used_to_fail_late_are_refused_with_exit_2(tmp_path, text, needle):
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    _assert_refused(_cli("experiment", "--spec", str(spec), "--out", str(tmp_path / "run")), needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["sweep", "CKPT", "--attack", "pgd(steps=1000000000)"], "steps must be an integer in [1, 10,000]"),
        (
            ["sweep", "CKPT", "--attack", "torchattacks:Square(n_queries=1000000000)"],
            "n_queries must be in [1, 100,000]",
        ),
        (["sweep", "CKPT", "--eps", "0:1:1e-9"], "makes 1,000,000,001 epsilons; the limit is 1,000"),
        (["report", "RUN", "--bootstrap", "1000000000"], "100<=x<=100000"),
        (["inspect", "small_cnn", "--in-channels", "1000000000"], "in_channels must be an integer in [1, 1,024]"),
    ],
)
def test_work_beyond_the_documented_limits_is_refused_up_front(trained_small, tiny_run, args, needle):
    """Item 5: these ran until killed or tried to allocate hundreds of gigabytes."""
    _, _, _, ckpt = trained_small
    _, run, _ = tiny_run
    args = [str(ckpt) if a == "CKPT" else str(run) if a == "RUN" else a for a in args]
    _assert_refused(_cli(*args), needle)


def _sweep_cmd(ckpt: Path, out: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "robustse.cli", "--quiet", "sweep", str(ckpt), "--attack", "fgsm", "--attack",
            "pgd(steps=5)", "--eps", "0,0.01,0.02,0.03,0.05", "--eval-subset", "200", "--out", str(out)]  # fmt: skip


def test_two_sweeps_into_one_run_directory_share_the_work(trained_small, tmp_path):
    """Item 6: the second of two concurrent sweeps died with an IntegrityError traceback."""
    import subprocess

    _, _, _, ckpt = trained_small
    run = tmp_path / "run"
    procs = [subprocess.Popen(_sweep_cmd(ckpt, run), stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert not any("Traceback" in e for e in errs)
    with sqlite3.connect(run / "results.db") as conn:
        keys = conn.execute("SELECT model, attack_key, eps FROM cells").fetchall()
        (rows,) = conn.execute("SELECT COUNT(*) FROM examples").fetchone()
    assert len(keys) == len(set(keys)) == 2 * 5 + 5  # fgsm, pgd and the noise control x 5 eps, once each
    assert rows == len(keys) * 200


def test_an_identity_recorded_by_a_concurrent_sweep_in_between_counts(tmp_path):
    """Two sweeps find no evaluation-set identity and both record theirs: the second's insert is
    the no-op, and its value is checked against the first's (the same: fine; another: one line),
    never an IntegrityError (the race the two-process test above hits only sometimes)."""
    import contextlib

    from robustse.core.errors import StoreError
    from robustse.core.store import ResultsStore

    for theirs, ok in (("abc", True), ("xyz", False)):
        path = tmp_path / f"{theirs}.db"
        mine, other = ResultsStore(path), ResultsStore(path)
        writing = mine.writing

        @contextlib.contextmanager
        def after_the_other(*args, _w=writing, _o=other, _v=theirs, **kwargs):  # type: ignore[no-untyped-def]
            _o.check_identity("evalset", _v, "evaluation set")  # it records first, after my SELECT
            with _w(*args, **kwargs) as conn:
                yield conn

        mine.writing = after_the_other  # type: ignore[method-assign]
        if ok:
            mine.check_identity("evalset", "abc", "evaluation set")
        else:
            with pytest.raises(StoreError, match="holds results for a different evaluation set"):
                mine.check_identity("evalset", "abc", "evaluation set")
        assert other.get_meta("evalset") == theirs
        mine.close()
        other.close()


def test_a_store_locked_by_another_process_is_one_line_and_kept(trained_small, tmp_path, monkeypatch):
    import robustse.core.store

    _, _, _, ckpt = trained_small
    run = tmp_path / "run"
    args = [
        "--quiet",
        "sweep",
        str(ckpt),
        "--attack",
        "fgsm",
        "--eps",
        "0,0.05",
        "--eval-subset",
        "20",
        "--out",
        str(run),
    ]
    assert _cli(*args).exit_code == 0
    before = _cells(run)
    monkeypatch.setattr(robustse.core.store, "LOCK_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(run / "results.db")
    holder.execute("BEGIN EXCLUSIVE")  # another process's long write transaction
    try:
        _assert_refused(_cli(*args[:-1], str(run), "--attack", "noise"), "is locked by another process")
    finally:
        holder.rollback()
        holder.close()
    assert _cells(run) == before


def test_a_read_only_store_is_readable_and_never_called_corrupt(tiny_run, tmp_path):
    """Item 6: a healthy read-only results.db was called "corrupt or foreign ... move it away"."""
    import subprocess

    _, out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    db = run / "results.db"
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i (an immutable file, read-only even for root) is not available here")
    try:
        res = _cli("report", str(run), "--bootstrap", "100")
        assert res.exit_code == 0, res.output
        res = _cli("--quiet", "sweep", str(run / "models" / "small_cnn_s0.safetensors"), "--attack", "fgsm",
                   "--eps", "0,0.02", "--eval-subset", "100", "--out", str(run))  # fmt: skip
        _assert_refused(res, "is read-only: results cannot be added to it")
        assert "corrupt" not in res.output
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)


@pytest.mark.parametrize(
    ("attack", "needle"),
    [
        ("torchattacks:TIFGSM(kernel_name=foo)", "torchattacks:TIFGSM: bad option value"),
        ("torchattacks:Square(loss=foo,n_queries=5)", "torchattacks:Square: bad option value"),
        ("pgd(abs_stepsize=1e308)", "abs_stepsize must be a number in (0, 1e+06]"),
    ],
)
def test_options_that_only_fail_inside_the_attack_are_one_line(trained_small, tmp_path, attack, needle):
    """Item 7: torchattacks options its own code rejects, and overflowing step sizes, were tracebacks."""
    _, _, _, ckpt = trained_small
    res = _cli("--quiet", "sweep", str(ckpt), "--attack", "fgsm", "--attack", attack, "--eps", "0,0.02",
               "--eval-subset", "8", "--out", str(tmp_path / "run"))  # fmt: skip
    _assert_refused(res, needle)
    assert not (tmp_path / "run" / "results.db").exists()  # refused before any cell (not even fgsm's) was stored


def test_item7_files_a_user_can_break_get_one_line(tiny_run, tmp_path):
    """Item 7: tracebacks from spec seeds out of range, --seed 2**64, an empty or non-UTF-8
    models.csv, and sparse or complex tensors in a state dict."""
    _, out, _ = tiny_run
    spec = tmp_path / "s.toml"
    spec.write_text("seeds = [9223372036854775807]\n")
    _assert_refused(_cli("experiment", "--spec", str(spec), "--out", str(tmp_path / "x")), "seeds must be integers in")
    _assert_refused(_cli("train", "small_cnn", "--seed", str(2**64)), "--seed")
    run = tmp_path / "run"
    shutil.copytree(out, run)
    for content in (b"", b"\xff\xfe\x00bad"):
        (run / "models.csv").write_bytes(content)
        _assert_refused(_cli("report", str(run), "--bootstrap", "100"), "models.csv: unreadable")
    state = rs.create_model("small_cnn").state_dict()
    key = "head.weight"
    for kind, tensor in (("sparse_coo", state[key].to_sparse()), ("complex", state[key].to(torch.complex64))):
        path = tmp_path / f"{kind}.pt"
        torch.save({**state, key: tensor}, path)
        _assert_refused(_cli("eval", str(path), "--arch", "small_cnn", "--eval-subset", "8"), f"is {kind}")


def test_a_resume_file_holding_a_list_does_not_block_training(real_fmnist, tmp_path):
    """Item 7: a resume file holding a list crashed every rerun until deleted by hand."""
    out = tmp_path / "m.safetensors"
    torch.save([1, 2, 3], tmp_path / "m.safetensors.resume.pt")
    res = _cli("--quiet", "train", "small_cnn", "--epochs", "1", "--train-subset", "200", "--eval-subset", "100",
               "--out", str(out))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert out.exists()


def test_signed_or_float_idx_labels_are_refused(tmp_path):
    """Item 7: negative or NaN labels in IDX files."""
    import gzip
    import struct

    from tests.conftest import write_fake_fmnist

    root = write_fake_fmnist(tmp_path / "data", n_train=20, n_test=20)
    for code, payload, needle in ((0x09, struct.pack(">20b", *([-1] * 20)), "label -1 out of range"),
                                  (0x0D, struct.pack(">20f", *([float("nan")] * 20)), "holds >f4 labels")):  # fmt: skip
        with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(bytes([0, 0, code, 1]) + struct.pack(">I", 20) + payload)
        out = tmp_path / "m.safetensors"
        res = _cli("train", "small_cnn", "--epochs", "1", "--data-root", str(root), "--out", str(out))
        _assert_refused(res, needle)


def test_non_finite_weights_are_named(trained_small, tmp_path):
    """Item 9: NaN weights evaluated silently."""
    model, _, _, _ = trained_small
    bad = rs.create_model("se_small_cnn")
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        next(bad.parameters()).view(-1)[:3] = float("nan")
    path = tmp_path / "nan.safetensors"
    rs.save_checkpoint(bad, path)
    res = _cli(
        "sweep", str(path), "--attack", "fgsm", "--eps", "0,0.02", "--eval-subset", "8", "--out", str(tmp_path / "r")
    )
    assert "warning: nan: 3 non-finite weight value(s)" in res.output
