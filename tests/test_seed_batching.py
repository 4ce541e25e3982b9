"""Seed batching: K models of one architecture as one stacked network, trained and saved per seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import robustse as rs
from robustse.core.config import DataConfig, TrainConfig
from robustse.models.checkpoint import load_checkpoint, read_metadata
from robustse.models.stacked import stack_models
from robustse.training.seeds import train_seeds
from robustse.training.train import load_splits, train_model

FAMILIES = ["small_cnn", "se_small_cnn", "static_small_cnn", "se_resnet20"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_stacked_members_compute_what_they_compute_alone(arch):
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(rs.create_model(arch, mean=[0.3], std=[0.35]))
    stacked = stack_models(members)
    x = torch.rand(3, 8, 1, 28, 28)  # each member its own batch
    for train in (False, True):  # eval, and training mode with each member's own batch statistics
        stacked.train(train)
        for m in members:
            m.train(train)
        alone = torch.stack([m(x[k]) for k, m in enumerate(members)], 1)
        torch.testing.assert_close(stacked.member_logits(x), alone, rtol=1e-5, atol=1e-5)
    cl = stack_models(members).eval().to_channels_last()  # the faster layout on CPU: same function
    torch.testing.assert_close(cl.member_logits(x), stacked.eval().member_logits(x), rtol=1e-5, atol=1e-5)
    for k, m in enumerate(members):  # running statistics too
        mine, theirs = stacked.member_state(k), m.state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-5)


DATA = DataConfig(train_subset=512, eval_subset=256)
CFG = TrainConfig(epochs=2, batch_size=64, augment=True)


@pytest.fixture(scope="module")
def splits(real_fmnist):
    return load_splits(DATA)


@pytest.mark.parametrize("arch", ["small_cnn", "se_small_cnn"])
def test_batched_members_match_training_each_seed_alone(arch, real_fmnist, tmp_path):
    seeds, data = [0, 1, 2], DataConfig(train_subset=2048, eval_subset=500)
    cfg = TrainConfig(epochs=2, augment=False, batch_size=64)
    splits = load_splits(data)
    alone = [
        train_model(arch, out=tmp_path / f"a{s}.safetensors", data=data, train=cfg, seed=s, splits=splits,
                    progress=False)
        for s in seeds
    ]  # fmt: skip
    outs = [tmp_path / f"b{s}.safetensors" for s in seeds]
    batched = train_seeds(arch, outs=outs, seeds=seeds, data=data, train=cfg, splits=splits, progress=False)
    for a, b in zip(alone, batched, strict=True):
        meta = read_metadata(b.checkpoint)
        assert meta["seed"] == a.meta["seed"] and meta["fingerprint"] == a.meta["fingerprint"]
        # 64 SGD steps amplify the kernels' rounding differences (README: seed batching): the
        # weights part ways, the accuracy does not
        assert b.meta["clean_accuracy"] > 0.65
        assert b.meta["clean_accuracy"] == pytest.approx(a.meta["clean_accuracy"], abs=0.04)
    # the members really are different models (own init, order, augmentation)
    w0, w1 = batched[0].model.state_dict(), batched[1].model.state_dict()
    assert not torch.equal(w0["blocks.0.convs.0.0.weight"], w1["blocks.0.convs.0.0.weight"])


@pytest.mark.parametrize("arch", ["small_cnn", "se_small_cnn", "static_small_cnn"])
def test_one_batched_step_equals_one_step_alone_to_rounding(arch, splits, tmp_path):
    one = TrainConfig(epochs=1, batch_size=512, augment=True)  # one step per epoch
    a = train_model(arch, out=tmp_path / "a.safetensors", data=DATA, train=one, seed=4, splits=splits,
                    progress=False)  # fmt: skip
    (b, _) = train_seeds(
        arch, outs=[tmp_path / "b.safetensors", tmp_path / "c.safetensors"], seeds=[4, 5], data=DATA,
        train=one, splits=splits, progress=False,
    )  # fmt: skip
    for key, v in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[key], v, rtol=1e-3, atol=5e-4)  # one step of rounding


def test_killed_batched_training_resumes_where_it_stopped(splits, tmp_path):
    seeds, outs = [0, 1], [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"]

    def stop_after_first(epoch, records):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_seeds("small_cnn", outs=outs, seeds=seeds, data=DATA, train=CFG, splits=splits, progress=False,
                    on_epoch=stop_after_first)  # fmt: skip
    assert all(o.with_name(o.name + ".resume.pt").exists() and not o.exists() for o in outs)
    lines: list[str] = []
    resumed = train_seeds("small_cnn", outs=outs, seeds=seeds, data=DATA, train=CFG, splits=splits, progress=False,
                          log=lines.append)  # fmt: skip
    assert sum("resuming after epoch 1/2" in line for line in lines) == 2
    assert [len(r.meta["history"]) for r in resumed] == [2, 2]
    straight = train_seeds("small_cnn", outs=[tmp_path / "s0.safetensors", tmp_path / "s1.safetensors"],
                           seeds=seeds, data=DATA, train=CFG, splits=splits, progress=False)  # fmt: skip
    for r, s in zip(resumed, straight, strict=True):  # resuming changes nothing
        for key, v in s.model.state_dict().items():
            torch.testing.assert_close(r.model.state_dict()[key], v)
    model, _ = load_checkpoint(outs[0])  # an ordinary per-seed checkpoint
    assert model.robustse_arch == "small_cnn"


def test_adversarial_training_falls_back_to_one_seed_at_a_time(splits, tmp_path):
    adv = TrainConfig(epochs=1, batch_size=256, augment=False, adv_eps=0.05)
    outs = [tmp_path / "x0.safetensors", tmp_path / "x1.safetensors"]
    res = train_seeds("small_cnn", outs=outs, seeds=[0, 1], data=DATA, train=adv, splits=splits, progress=False)
    alone = train_model("small_cnn", out=tmp_path / "y0.safetensors", data=DATA, train=adv, seed=0, splits=splits,
                        progress=False)  # fmt: skip
    for key, v in alone.model.state_dict().items():
        torch.testing.assert_close(res[0].model.state_dict()[key], v, rtol=0, atol=0)  # trained alone: identical


def test_experiments_train_seed_groups_batched_when_asked(real_fmnist, tmp_path):
    from robustse.core.config import ExperimentSpec, ModelsConfig
    from robustse.experiment.pipeline import run_experiment

    spec = ExperimentSpec(
        name="batched", seeds=(0, 1), data=DataConfig(train_subset=2048, eval_subset=300),
        models=ModelsConfig(twins=("small_cnn",), static=True, batch_seeds=True),
        train=TrainConfig(epochs=2, augment=False, batch_size=64), sweep=None,
    )  # fmt: skip
    lines: list[str] = []
    res = run_experiment(spec, tmp_path / "run", progress=False, log=lines.append)
    assert [r.label for r in res.rows] == [
        "small_cnn_s0",
        "se_small_cnn_s0",
        "static_small_cnn_s0",
        "small_cnn_s1",
        "se_small_cnn_s1",
        "static_small_cnn_s1",
    ]  # fmt: skip  (plan order kept; each architecture's two seeds trained as one network)
    assert all(r.clean_accuracy > 0.65 for r in res.rows), [r.clean_accuracy for r in res.rows]
    assert sum("seed" in line and "epoch 2/2:" in line for line in lines) == 6  # each member's epoch line
    eta_lines = [line for line in lines if line.startswith("train: ")]  # per group: each epoch, then done
    assert len(eta_lines) == 9 and all(line.endswith(" left") for line in eta_lines), eta_lines
    assert eta_lines[0].startswith("train: small_cnn ×2 seeds (main), group 1/3, epoch 1/2, about ")
    assert eta_lines[-1] == "train: static_small_cnn ×2 seeds (main), group 3/3 done, about 0 s left"
    again = run_experiment(spec, tmp_path / "run", progress=False)  # finished checkpoints are reused
    assert [r.clean_accuracy for r in again.rows] == [r.clean_accuracy for r in res.rows]


@pytest.fixture(scope="module")
def three_seeds(real_fmnist, tmp_path_factory):
    """Three se_small_cnn seeds and a plain small_cnn seed, briefly trained, as checkpoints."""
    out = tmp_path_factory.mktemp("seeds")
    data, cfg = DataConfig(train_subset=2048, eval_subset=200), TrainConfig(epochs=1, augment=False, batch_size=64)
    paths = []
    for arch, seed in [("se_small_cnn", 0), ("se_small_cnn", 1), ("small_cnn", 0), ("se_small_cnn", 2)]:
        path = out / f"{arch}_s{seed}.safetensors"
        train_model(arch, out=path, data=data, train=cfg, seed=seed, progress=False)
        paths.append(str(path))
    return paths


def _stores(paths, tmp_path, **options):
    from robustse.core.config import SweepConfig
    from robustse.core.store import ResultsStore
    from robustse.experiment.setup import sweep_checkpoints

    # exact: the models themselves, so stacking is the only difference (the eval-mode copy's
    # rounding differs between a stacked and a lone network, and PGD steps grow it)
    attacks = ({"name": "fgsm", "exact": True}, {"name": "pgd", "steps": 3, "exact": True},
               {"name": "pgd", "norm": "l2", "steps": 3, "exact": True}, {"name": "gate", "steps": 2, "exact": True},
               {"name": "noise", "exact": True})  # fmt: skip
    out = {}
    for flag in (False, True):
        cfg = SweepConfig(epsilons=(0.0, 0.03), attacks=attacks, eval_subset=96, batch_size=40, probe_subsample=16,
                          seed_batching=flag, **options)  # fmt: skip
        run = tmp_path / str(flag)
        res = sweep_checkpoints(paths, cfg, run, progress=False)
        with ResultsStore(run / "results.db") as store:
            out[flag] = (res, store.examples(), store.probe_table("sites"), store.cells())
    return out


def test_batched_sweep_rows_equal_one_model_at_a_time(three_seeds, tmp_path, monkeypatch):
    from robustse.experiment.sweep import Sweep

    calls: list[int] = []
    together = Sweep._adversarials_together

    def counted(self, lads, *args):  # type: ignore[no-untyped-def]
        calls.append(len(lads))
        return together(self, lads, *args)

    monkeypatch.setattr(Sweep, "_adversarials_together", counted)
    out = _stores(three_seeds, tmp_path)
    # the three SE seeds went together (FGSM, PGD, PGD-L2, 2 noise controls; 2 eps; 3 batches each);
    # the gate attack and the lone plain model one at a time
    assert calls and set(calls) == {3} and len(calls) == 5 * 2 * 3
    (_, ea, sa, ca), (res, eb, sb, cb) = out[False], out[True]
    key = ["model", "attack_key", "eps", "idx"]
    ea, eb = ea.sort_values(key).reset_index(drop=True), eb.sort_values(key).reset_index(drop=True)
    assert len(ea) == len(eb) == 96 * (3 * 6 * 2 + 5 * 2)  # 3 SE models x 6 attacks (noise per norm), plain x 5
    for col in ("label", "clean_pred", "adv_pred", "correct"):  # the same predictions, row for row
        assert ea[col].tolist() == eb[col].tolist(), col
    for col in ("adv_margin", "logit_sensitivity", "kl", "cg_sensitivity"):  # to float rounding
        np.testing.assert_allclose(eb[col].to_numpy(float), ea[col].to_numpy(float), rtol=1e-3, atol=1e-4)
    sk = ["model", "attack_key", "eps", "site", "metric"]
    sa, sb = sa.sort_values(sk).reset_index(drop=True), sb.sort_values(sk).reset_index(drop=True)
    np.testing.assert_allclose(sb["mean"].to_numpy(float), sa["mean"].to_numpy(float), rtol=1e-3, atol=1e-5)
    cols = ["model", "attack_key", "eps", "correct", "status"]
    assert ca.sort_values(cols)[cols].values.tolist() == cb.sort_values(cols)[cols].values.tolist()
    assert all(c.status != "fail" for c in res.checks)


def test_stacked_attacks_equal_attacks_on_each_member_alone():
    from robustse.attacks import create_attack
    from robustse.core.errors import AttackError
    from robustse.models.stacked import MemberRows, member_rows

    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(rs.create_model("se_small_cnn", mean=[0.3], std=[0.35]).eval())
    rows = MemberRows(stack_models(members).eval())
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    attacks = (create_attack("pgd", steps=3), create_attack("pgd", norm="l2", steps=3, restarts=2),
               create_attack("fgsm"), create_attack("noise", norm="l2"))  # fmt: skip
    for atk in attacks:
        eps = 0.05 if atk.norm == "linf" else 1.0
        (together,) = atk(rows, member_rows(x, 2), y.repeat(2), epsilons=[eps], stream=3, members=2).adversarials
        for k, m in enumerate(members):
            (alone,) = atk(m, x, y, epsilons=[eps], stream=3).adversarials
            torch.testing.assert_close(together[16 * k : 16 * (k + 1)], alone, rtol=0, atol=1e-5)
    with pytest.raises(AttackError, match="one eps at a time"):  # a lone member draws its eps together
        create_attack("pgd")(rows, member_rows(x, 2), y.repeat(2), epsilons=[0.03, 0.1], members=2)
    with pytest.raises(AttackError, match="cannot attack a stacked model"):
        create_attack("gate")(rows, member_rows(x, 2), y.repeat(2), epsilons=[0.03], members=2)


def test_stacked_rows_that_do_not_fit_a_pass_are_attacked_one_model_at_a_time(three_seeds, tmp_path, monkeypatch):
    """Three seeds x 40 rows do not fit passes of 100 rows: a pass cut out of the stacked rows would
    split the members' rows, so the seeds go one at a time, with the rows of the unstacked sweep."""
    from robustse.experiment.sweep import Sweep

    calls: list[int] = []
    together = Sweep._adversarials_together
    monkeypatch.setattr(
        Sweep, "_adversarials_together", lambda self, lads, *a: calls.append(1) or together(self, lads, *a)
    )
    out = _stores(three_seeds, tmp_path, pass_rows=100)
    assert calls == []
    key = ["model", "attack_key", "eps", "idx"]
    ea, eb = (out[flag][1].sort_values(key).reset_index(drop=True) for flag in (False, True))
    assert ea[["adv_pred", "adv_margin"]].equals(eb[["adv_pred", "adv_margin"]])


def test_stacked_rows_past_the_pass_budget_are_attacked_one_model_at_a_time(three_seeds, tmp_path, monkeypatch):
    """With no pass_rows, a batch of 40 fits the budget of 60 rows but three stacked seeds (120 rows)
    do not: they go one at a time, whole batches each, and the options are left as given."""
    import robustse.attacks.base as A
    import robustse.core.passes as PS
    import robustse.experiment.sweep as S
    from robustse.core.config import SweepConfig
    from robustse.experiment.setup import sweep_checkpoints

    monkeypatch.setattr(S, "grad_bytes_per_row", lambda model, x: 1000)
    monkeypatch.setattr(PS, "CPU_PASS_MEMORY", 60 * 1000)
    calls: list[int] = []
    together = S.Sweep._adversarials_together
    monkeypatch.setattr(
        S.Sweep, "_adversarials_together", lambda self, lads, *a: calls.append(1) or together(self, lads, *a)
    )
    seen: list[int] = []
    grad = A._chunk_grad
    monkeypatch.setattr(A, "_chunk_grad", lambda m, x, y, b: seen.append(len(x)) or grad(m, x, y, b))
    cfg = SweepConfig(epsilons=(0.03,), attacks=({"name": "fgsm"},), eval_subset=80, batch_size=40, probes=False,
                      seed_batching=True)  # fmt: skip
    lines: list[str] = []
    sweep_checkpoints(three_seeds, cfg, tmp_path / "run", progress=False, log=lines.append)
    assert calls == [] and max(seen) == 40
    assert sum("do not fit a pass of 60" in line for line in lines) == 1
    monkeypatch.setattr(PS, "CPU_PASS_MEMORY", 200 * 1000)  # 120 rows fit: stacked
    sweep_checkpoints(three_seeds, cfg, tmp_path / "stacked", progress=False)
    assert calls and cfg.pass_rows is None
