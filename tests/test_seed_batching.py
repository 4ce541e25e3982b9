"""Seed batching: K models of one architecture as one stacked network, trained and saved per seed."""

from __future__ import annotations

import pytest
import torch

import robustse as rs
from robustse.batched import stack_models
from robustse.checkpoint import load_checkpoint, read_metadata
from robustse.config import DataConfig, TrainConfig
from robustse.train import load_splits, train_model
from robustse.train_batched import train_seeds

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
    from robustse.config import ExperimentSpec, ModelsConfig
    from robustse.pipeline import run_experiment

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
    assert sum("epoch 2/2" in line for line in lines) == 6
    again = run_experiment(spec, tmp_path / "run", progress=False)  # finished checkpoints are reused
    assert [r.clean_accuracy for r in again.rows] == [r.clean_accuracy for r in res.rows]
