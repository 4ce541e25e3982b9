"""Strict spec loading: every spec in attacks/ loads; typos and bad values name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustse.core.config import ExperimentSpec, load_spec
from robustse.core.errors import SpecError

SPECS = sorted((Path(__file__).parent.parent / "attacks").glob("*.toml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_every_shipped_spec_loads(path):
    spec = load_spec(path)
    assert isinstance(spec, ExperimentSpec) and spec.name == path.stem
    assert isinstance(spec.seeds, tuple) and spec.models.twins


def _write(tmp_path, text):
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("seed = [0]", r"s.toml: unknown key 'seed' \(valid: arms, data, models, name, report, seeds, sweep, train\)"),
        ("[train]\nepoch = 3", r"unknown key 'train.epoch' \(valid: .*epochs"),
        ("[train]\nepochs = 'three'", r"train.epochs: expected int, got str 'three'"),
        ("[train]\nepochs = 2.5", r"train.epochs: expected int"),
        ("[train]\nepochs = 0", r"train.epochs must be >= 1"),
        ("[train]\nschedule = 'step'", r"train.schedule: 'step' is not one of 'onecycle', 'cosine'"),
        ("[train]\naugment = 1", r"train.augment: expected bool"),
        ("[data]\ntrain_subset = 0", r"data.train_subset must be >= 1"),
        ("seeds = []", r"seeds must list at least one seed"),
        ("seeds = [1, 1]", r"seeds must be distinct"),
        ("seeds = 3", r"seeds: expected list of int"),
        ("[models]\ntwins = 'cnn'", r"models.twins: expected list of str"),
        ("name = '../../etc'", r"invalid run name '../../etc'"),
        ("[train\nepochs = 1", r"s.toml: invalid TOML"),
        ("train = 3", r"train: expected a table"),
        ("[sweep]\nepsilons = []", r"sweep.epsilons must list at least one eps"),
        ("[sweep]\nepsilons = [-0.5]", r"sweep.epsilons: -0.5 < 0"),
        ("[sweep]\nnorm = 'l1'", r"sweep.norm: 'l1' is not one of 'linf', 'l2'"),
        ("[sweep]\nattacks = ['pgd']", r"sweep.attacks\[0\]: expected a table, got str 'pgd'"),
        ("[sweep]\nbatch = 3", r"unknown key 'sweep.batch' \(valid: accuracy_only, attacks, batch_size"),
    ],
)
def test_bad_specs(tmp_path, text, match):
    with pytest.raises(SpecError, match=match):
        load_spec(_write(tmp_path, text))


def test_defaults_and_conversion(tmp_path):
    spec = load_spec(_write(tmp_path, "seeds = [2, 3]\n[train]\nlr = 1\n[models]\nse_options = {reduction = 4}"))
    assert spec.name == "s" and spec.seeds == (2, 3)
    assert spec.train.lr == 1.0 and isinstance(spec.train.lr, float)
    assert spec.train.epochs == 5 and spec.data.dataset == "fashion-mnist"
    assert spec.models.se_options == {"reduction": 4}


def test_sweep_table(tmp_path):
    spec = load_spec(_write(tmp_path, "[sweep]\nepsilons = [0.01, 0.03]\nattacks = [{name = 'pgd', steps = 5}]"))
    assert spec.sweep is not None and spec.sweep.epsilons == (0.0, 0.01, 0.03)  # eps = 0 is always measured
    assert spec.sweep.attacks == ({"name": "pgd", "steps": 5},)
    assert load_spec(_write(tmp_path, "seeds = [1]")).sweep is None


def test_missing_spec(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.toml")
