"""``imagefolder:<DIR>`` datasets and ``timm:<name>`` models, on real photos.

The foolbox wheel ships 20 ImageNet validation photos (label in the file name) and CIFAR-10
samples; they are laid out here as class folders the way a user's ImageNet folder is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import robustse as rs
from robustse.core.errors import DataError
from robustse.data.folder import load_image_folder, prepare_image
from robustse.models.external import Preprocess

foolbox = pytest.importorskip("foolbox")
timm = pytest.importorskip("timm")
FOOLBOX_DATA = Path(foolbox.__file__).parent / "data"


def _photos(prefix: str) -> list[tuple[Path, int]]:
    """(path, label) of foolbox's sample photos named ``<prefix>_<i>_<label>.<ext>``."""
    return [(f, int(f.stem.rsplit("_", 1)[1])) for f in sorted(FOOLBOX_DATA.glob(f"{prefix}_*"))]


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory) -> Path:
    """20 ImageNet photos in synset-style folders, with the 1,000-line class list fixing label = index."""
    root = tmp_path_factory.mktemp("imagenet") / "val"
    for f, label in _photos("imagenet"):
        (root / f"n{label:08d}").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / f"n{label:08d}" / f.name)
    (root / "classes.txt").write_text("".join(f"n{i:08d}\n" for i in range(1000)))
    return root


@pytest.fixture(scope="module")
def seresnet18_weights(tmp_path_factory) -> Path:
    """A timm SE-ResNet-18 state dict as a user's safetensors file (random weights, 1,000 classes)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "seresnet18.safetensors"
    save_file(timm.create_model("seresnet18", pretrained=False).state_dict(), str(path))
    return path


def test_labels_follow_the_class_list_and_subsets_match_in_memory_datasets(imagenet_dir):
    listing = load_image_folder(f"imagefolder:{imagenet_dir}", "test")
    assert len(listing) == 20 and listing.num_classes == 1000
    expected = sorted((f"n{label:08d}", f.name, label) for f, label in _photos("imagenet"))
    assert listing.y.tolist() == [label for *_, label in expected]
    sub = listing.subset(7, seed=3)
    reference = rs.Dataset("ref", "test", torch.zeros(20, 1, 2, 2, dtype=torch.uint8), listing.y, ("a",) * 1000)
    assert sub.y.tolist() == reference.subset(7, seed=3).y.tolist()  # the same seeded selection
    assert sub.x.shape == (7, 3, 224, 224) and sub.x.dtype == torch.uint8


def test_sorted_folder_names_are_the_classes_without_a_list(tmp_path):
    for f, label in _photos("cifar10")[:6]:
        (tmp_path / f"class{label}").mkdir(exist_ok=True)
        shutil.copy(f, tmp_path / f"class{label}" / f.name)
    listing = load_image_folder(f"imagefolder:{tmp_path}", "test", Preprocess((32, 32), 1.0, "bilinear"))
    names = sorted({f"class{label}" for _, label in _photos("cifar10")[:6]})
    assert listing.classes == tuple(names)
    ds = listing.subset(None)
    assert ds.x.shape == (6, 3, 32, 32)
    first = next(f for f, label in sorted(_photos("cifar10")[:6], key=lambda p: (f"class{p[1]}", p[0].name)))
    import numpy as np
    from PIL import Image

    pixels = torch.from_numpy(np.array(Image.open(first).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(ds.x[0], pixels)  # a 32x32 image at crop 1.0 is unchanged


def test_preprocessing_matches_timms_own_eval_transform(imagenet_dir):
    """Our resize + centre crop of a real photo is exactly timm's own eval pipeline (up to uint8 storage)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = rs.create_model("timm:seresnet18")
    cfg = resolve_data_config({}, model=model.net)
    reference = create_transform(**{**cfg, "mean": (0, 0, 0), "std": (1, 1, 1)})
    photo = next(iter(sorted(imagenet_dir.rglob("*.jpg"))))
    ours = prepare_image(photo, model.preprocess).float() / 255
    theirs = reference(Image.open(photo).convert("RGB"))
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert float((ours - theirs).abs().max()) < 1e-6


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the mappings from Linux's /proc")
def test_large_selections_decode_into_a_scratch_file_that_is_already_gone(imagenet_dir, monkeypatch, tmp_path):
    """Past the in-memory size the decoded images live in a memory-mapped file under $TMPDIR: the
    same pixels, a mapping of a file whose name was removed before it was filled, nothing left
    in the folder, and the mapping gone with the tensor."""
    import gc

    import robustse.data.folder as folder

    def scratch_mappings() -> list[str]:  # this process's mappings of deleted scratch files
        maps = Path("/proc/self/maps").read_text().splitlines()
        return [m for m in maps if str(tmp_path / "robustse-images-") in m and m.endswith("(deleted)")]

    listing = load_image_folder(f"imagefolder:{imagenet_dir}", "test")
    in_memory = listing.subset(6, seed=1)
    monkeypatch.setattr(folder, "IN_MEMORY_BYTES", 5 * 3 * 224 * 224)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert listing.subset(5, seed=1) is not None and scratch_mappings() == []  # 5 images fit in memory
    named: list[list[Path]] = []  # what the folder holds while the file's blocks are allocated
    allocate = folder._allocate
    monkeypatch.setattr(folder, "_allocate", lambda fd, n: named.append(list(tmp_path.iterdir())) or allocate(fd, n))
    mapped = listing.subset(6, seed=1)
    assert named == [[]] and len(scratch_mappings()) == 1 and list(tmp_path.iterdir()) == []
    assert torch.equal(mapped.x, in_memory.x) and torch.equal(mapped.y, in_memory.y)
    del mapped
    gc.collect()
    assert scratch_mappings() == []


def test_no_room_for_the_scratch_file_is_one_line_naming_the_subset_option(cifar_dir, monkeypatch, tmp_path):
    import robustse.data.folder as folder

    monkeypatch.setenv("TMPDIR", str(tmp_path))

    monkeypatch.setattr(folder, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(folder, "SCRATCH_SPARE", 1 << 62)  # more than any disk has free
    train = load_image_folder(f"imagefolder:{cifar_dir}", "train", folder.training_preprocess(None))
    with pytest.raises(DataError, match=r"40 images of 3x64x64: .*\(set TMPDIR to a larger disk\); train on a"):
        train.subset(None)
    with pytest.raises(DataError, match="evaluate a smaller subset .--eval-subset."):
        load_image_folder(f"imagefolder:{cifar_dir}", "test").subset(None)
    monkeypatch.setattr(folder, "SCRATCH_SPARE", 0)

    def no_mapping(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(folder.mmap, "mmap", no_mapping)  # e.g. an address-space limit (ulimit -v)
    with pytest.raises(DataError, match="cannot make a 0.0 GiB scratch file in .* .Cannot allocate memory"):
        train.subset(None)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))  # not a folder: said, not silently replaced
    with pytest.raises(DataError, match="cannot make a scratch file in .*missing .No such file or directory"):
        train.subset(None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "no class sub-folders"),
        ({"a/readme.txt": b"x"}, "no images"),
        ({"zzz/x.jpg": b"x", "classes.txt": b"a\nb\n"}, "'zzz' is not in classes.txt"),
        ({"a/x.jpg": b"x", "classes.txt": b"a\nb\na\n"}, "class 'a' is listed more than once"),
    ],
)
def test_bad_folders_are_refused(tmp_path, layout, message):
    for rel, data in layout.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    with pytest.raises(DataError, match=message):
        load_image_folder(f"imagefolder:{tmp_path}", "test")


def test_a_class_folder_that_cannot_be_listed_is_one_line(imagenet_dir, seresnet18_weights, monkeypatch):
    """A sub-folder the user may not read (root ignores permissions, so the OS error is simulated)."""
    locked = next(p for p in imagenet_dir.iterdir() if p.is_dir())
    iterdir = Path.iterdir

    def refuse(self: Path):  # type: ignore[no-untyped-def]
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refuse)
    res = _cli("drift", f"timm:seresnet18={seresnet18_weights}", "--dataset", f"imagefolder:{imagenet_dir}")
    assert res.exit_code == 2 and f"cannot list {locked} (Permission denied)" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


def test_a_folder_without_train_and_val_has_no_training_split(imagenet_dir):
    with pytest.raises(DataError, match="no training split"):
        load_image_folder(f"imagefolder:{imagenet_dir}", "train")


def test_timm_model_loads_user_weights_and_takes_its_pretrained_config(seresnet18_weights):
    model, meta = rs.load_checkpoint(seresnet18_weights, arch="timm:seresnet18", arch_kwargs={"num_classes": 1000})
    reference = timm.create_model("seresnet18", pretrained=False)
    from safetensors.torch import load_file

    reference.load_state_dict(load_file(str(seresnet18_weights)))
    x = torch.rand(2, 3, 224, 224)
    mean, std = torch.tensor(reference.pretrained_cfg["mean"]), torch.tensor(reference.pretrained_cfg["std"])
    with torch.no_grad():
        expected = reference.eval()((x - mean[:, None, None]) / std[:, None, None])
        assert torch.allclose(model(x), expected, atol=1e-5)  # normalization lives inside the wrapper
    assert model.preprocess == Preprocess((224, 224), 0.875, "bicubic")
    assert len(rs.find_gates(model)) == 8


def _cli(*args: str):  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from robustse.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_sweep_and_drift_of_a_timm_se_resnet_on_an_image_folder(imagenet_dir, seresnet18_weights, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """The SE-ResNet-18 and its plain twin (timm's pretrained configs differ in crop: both get the
    first model's), swept through the CLI; the report pairs them as twins of family resnet18. The
    photos are decoded into a scratch file (as a selection over 1 GiB would be)."""
    from safetensors.torch import save_file

    import robustse.data.folder as folder

    monkeypatch.setattr(folder, "IN_MEMORY_BYTES", 0)

    torch.manual_seed(1)
    plain_weights = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(plain_weights))
    model = f"timm:seresnet18={seresnet18_weights}"
    out = tmp_path / "run"
    res = _cli("sweep", model, f"timm:resnet18={plain_weights}", "--dataset", f"imagefolder:{imagenet_dir}",
               "--eps", "0,0.004", "--attack", "fgsm", "--out", str(out))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "every model sees the first's" in res.output
    from robustse.core.store import ResultsStore

    rows = ResultsStore(out / "results.db").examples()
    assert len(rows) == 2 * 20 * 2 * 2  # 2 models x 20 photos x (fgsm, noise) x 2 eps
    assert set(rows["label"]) == {label for _, label in _photos("imagenet")}
    assert _cli("report", str(out), "--bootstrap", "100").exit_code == 0
    import pandas as pd

    stats = pd.read_csv(out / "stats.csv")
    primary = stats[stats.endpoint == "primary"].iloc[0]
    assert (primary.family, primary.baseline, primary.n_pairs) == ("resnet18", "plain", 1)
    assert primary.verdict == "too few seeds"  # one pretrained model per arm: no CI over seeds
    folder = f"imagefolder:{imagenet_dir}"
    res = _cli("drift", model, "--dataset", folder, "--eps", "0.004", "--attack", "fgsm", "--json")
    assert res.exit_code == 0, res.output
    gates = [r for r in json.loads(res.stdout)["result"] if r["kind"] == "gate"]
    assert len(gates) == 8 * 2  # 8 SE gates, adversarial and noise
    assert all(r["gate_drift"] >= 0 for r in gates)


def test_external_twins_share_a_family_without_the_se_prefix():
    from robustse.analysis.rundata import external_family

    names = ["timm:seresnet50", "timm:resnet50", "timm:legacy_seresnet50", "torchvision:resnet50"]
    assert {external_family(n) for n in names} == {"resnet50"}
    assert external_family("timm:seresnext26d_32x4d") == external_family("timm:resnext26d_32x4d")
    assert external_family("timm:legacy_senet154") == "legacy_senet154"  # no plain twin exists: left alone


def test_cli_refuses_bad_image_folders_in_one_line(imagenet_dir, seresnet18_weights, tmp_path):
    model = f"timm:seresnet18={seresnet18_weights}"
    broken = tmp_path / "broken"
    shutil.copytree(imagenet_dir, broken)
    (broken / "n00000243" / "truncated.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    cases = [
        (["--dataset", f"imagefolder:{tmp_path / 'missing'}"], "no such folder"),
        (["--dataset", f"imagefolder:{broken}"], "truncated.jpg: unreadable image"),
        (["--dataset", f"imagefolder:{imagenet_dir}", "--num-classes", "10"], "does not fit"),
    ]
    for extra, message in cases:
        res = _cli("drift", model, *extra, "--eps", "0.004", "--attack", "fgsm")
        assert res.exit_code == 2 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1


def test_a_wrong_class_count_is_one_line_before_the_selection_is_decoded(imagenet_dir, seresnet18_weights, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    """Weights with 1,000 outputs on a folder whose sorted sub-folders are its only classes: one
    line naming both counts, after two photos are decoded to check the fit, not the selection."""
    from robustse.data.folder import ImageFolder

    no_list = tmp_path / "no_list"
    shutil.copytree(imagenet_dir, no_list, ignore=shutil.ignore_patterns("classes.txt"))
    n_classes = sum(p.is_dir() for p in no_list.iterdir())
    decoded: list[int] = []
    decode = ImageFolder.decode
    monkeypatch.setattr(ImageFolder, "decode", lambda self, idx: decoded.append(len(idx)) or decode(self, idx))
    for command, extra in (("sweep", ["--out", str(tmp_path / "out")]), ("drift", ["--json"])):
        decoded.clear()
        res = _cli(command, f"timm:seresnet18={seresnet18_weights}", "--dataset", f"imagefolder:{no_list}",
                   "--num-classes", "1000", "--eps", "0.004", "--attack", "fgsm", *extra)  # fmt: skip
        assert res.exit_code == 2 and f"has {n_classes} classes but" in res.output and "outputs 1000" in res.output
        assert len(res.output.strip().splitlines()) == 1 and decoded == [2], (command, res.output, decoded)
    assert not (tmp_path / "out").exists()


def test_senet_imagenet_spec_runs_with_local_weights_and_folder(imagenet_dir, seresnet18_weights, tmp_path):
    """attacks/senet_imagenet.toml as shipped, with its weight files and folder pointed at the test's
    (ResNet-18 sized for speed): `robustse sweep --spec` reads the models and the dataset from it."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    plain = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(plain))
    text = (Path(__file__).parent.parent / "attacks" / "senet_imagenet.toml").read_text()
    text = text.replace("timm:resnet50=weights/resnet50.safetensors", f"timm:resnet18={plain}")
    text = text.replace("timm:seresnet50=weights/seresnet50.safetensors", f"timm:seresnet18={seresnet18_weights}")
    text = text.replace("imagefolder:data/imagenet/val", f"imagefolder:{imagenet_dir}")
    spec = tmp_path / "senet.toml"
    spec.write_text(text)
    out = tmp_path / "run"
    res = _cli("--quiet", "sweep", "--spec", str(spec), "--eval-subset", "4", "--attack", "fgsm", "--eps", "0,0.002",
               "--out", str(out))  # fmt: skip
    assert res.exit_code == 0, res.output
    from robustse.core.store import ResultsStore

    assert set(ResultsStore(out / "results.db").models().model) == {
        f"timm-resnet18@{plain.stem}", f"timm-seresnet18@{seresnet18_weights.stem}",
        f"timm-seresnet18@{seresnet18_weights.stem}@held_gates",
    }  # fmt: skip


def test_an_experiment_refuses_a_sweep_dataset_before_writing_anything(tmp_path):
    spec = tmp_path / "x.toml"
    spec.write_text('name = "x"\n[sweep]\ndataset = "imagefolder:/nowhere"\n')
    res = _cli("experiment", "--spec", str(spec), "--out", str(tmp_path / "run"))
    assert res.exit_code == 2 and "sweep.dataset is for `robustse sweep --spec`" in res.output
    assert not (tmp_path / "run").exists()


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    """foolbox's 20 CIFAR-10 photos as a train/ + val/ folder: train holds each photo and its mirror
    image, val the photos; ``val`` has no ``frog`` folder (a class missing from one split)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cifar")
    for f, label in _photos("cifar10"):
        name = CIFAR10_CLASSES[label]
        with Image.open(f) as img:
            (root / "train" / name).mkdir(parents=True, exist_ok=True)
            img.save(root / "train" / name / f.name)
            img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "train" / name / f"mirror_{f.name}")
            if name != "frog":
                (root / "val" / name).mkdir(parents=True, exist_ok=True)
                img.save(root / "val" / name / f.name)
    return root


def test_splits_share_one_class_list_when_a_class_is_missing_from_one(cifar_dir):
    train = load_image_folder(f"imagefolder:{cifar_dir}", "train")
    val = load_image_folder(f"imagefolder:{cifar_dir}", "test")
    present = sorted({CIFAR10_CLASSES[label] for _, label in _photos("cifar10")})
    assert "frog" in present and train.classes == val.classes == tuple(present)
    assert [train.classes[i] for i in val.y.tolist()] == [p.parent.name for p in val.files]


def test_an_experiment_trains_and_attacks_robustse_models_on_an_image_folder(cifar_dir, tmp_path, monkeypatch):
    """`[data] dataset = "imagefolder:DIR"`: the photos decoded at `image_size` (32: CIFAR's own
    pixels, unchanged), twins trained and swept, the report written; the checkpoints remember how
    the photos were prepared, so a later `robustse sweep CKPT` decodes them the same way."""
    from robustse.core.config import DataConfig
    from robustse.models.checkpoint import load_checkpoint, read_metadata
    from robustse.training.train import load_splits

    data = DataConfig(dataset=f"imagefolder:{cifar_dir}", image_size=32)
    train, test = load_splits(data)
    n_val = sum(CIFAR10_CLASSES[label] != "frog" for _, label in _photos("cifar10"))
    assert train.x.shape == (40, 3, 32, 32) and len(test) == n_val
    import numpy as np
    from PIL import Image

    airplane = sorted((cifar_dir / "train" / "airplane").iterdir())[0]
    with Image.open(airplane) as img:
        pixels = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(train.x[0], pixels)  # 32-px photos at image_size 32: the file's own pixels

    spec = tmp_path / "folder.toml"
    monkeypatch.chdir(cifar_dir.parent)  # the spec names the folder relative to here
    spec.write_text(
        f'name = "folder"\nseeds = [0, 1]\n[data]\ndataset = "imagefolder:{cifar_dir.name}"\nimage_size = 32\n'
        '[models]\ntwins = ["small_cnn"]\n[train]\nepochs = 1\nbatch_size = 16\n'
        '[sweep]\nepsilons = [0, 0.01]\nattacks = [{name = "fgsm"}]\nbatch_size = 16\n[report]\nbootstrap = 100\n'
    )
    out = tmp_path / "run"
    res = _cli("--quiet", "experiment", "--spec", str(spec), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert (out / "report.md").is_file() and "too few seeds" in res.output
    ckpt = out / "models" / "se_small_cnn_s0.safetensors"
    meta = read_metadata(ckpt)
    assert meta["preprocess"] == {"size": [32, 32], "crop_pct": 1.0, "interpolation": "bilinear"}
    assert meta["dataset"] == f"imagefolder:{cifar_dir}"  # absolute: found from any working directory
    assert load_checkpoint(ckpt)[0].preprocess == Preprocess((32, 32), 1.0, "bilinear")
    monkeypatch.chdir(tmp_path)
    res = _cli("--quiet", "sweep", str(ckpt), "--eps", "0,0.01", "--attack", "fgsm", "--out", str(tmp_path / "again"))
    assert res.exit_code == 0, res.output
    from robustse.core.store import ResultsStore

    assert len(ResultsStore(tmp_path / "again" / "results.db").examples()) == n_val * 2 * 2  # fgsm, noise x 2 eps
    given = tmp_path / "given.toml"  # the checkpoints evaluated at another size: refused before the run starts
    given.write_text(f'name = "given"\n[data]\ndataset = "imagefolder:{cifar_dir}"\n'
                     f'[models]\ncheckpoints = ["{out}/models/*.safetensors"]\n')  # fmt: skip
    res = _cli("experiment", "--spec", str(given), "--out", str(tmp_path / "given"))
    assert res.exit_code == 2 and "prepared at 32x32, but [data] image_size prepares them at 64x64" in res.output
    assert not (tmp_path / "given").exists()
    from robustse.core.config import load_spec
    from robustse.experiment.pipeline import check_experiment

    given.write_text(given.read_text().replace("[models]", "image_size = 32\n[models]"))
    check_experiment(load_spec(given))  # trained at the size [data] asks for: accepted
    from robustse.data.folder import ImageFolder

    decoded: list[tuple[str, int]] = []  # given models are not trained: the train split is only listed
    decode = ImageFolder.decode
    monkeypatch.setattr(
        ImageFolder, "decode", lambda self, idx: decoded.append((self.split, len(idx))) or decode(self, idx)
    )
    given.write_text(given.read_text() + '[sweep]\nepsilons = [0.01]\nattacks = [{name = "fgsm"}]\nbatch_size = 16\n')
    res = _cli("--quiet", "experiment", "--spec", str(given), "--out", str(tmp_path / "given"))
    assert res.exit_code == 0, res.output
    assert [split for split, _ in decoded] == ["test"]  # gate means: in the checkpoints since training


def test_image_size_is_for_image_folders_and_has_limits(cifar_dir, tmp_path):
    from robustse.core.config import DataConfig
    from robustse.core.errors import SpecError

    with pytest.raises(SpecError, match="data.image_size is for imagefolder:DIR datasets"):
        DataConfig(dataset="fashion-mnist", image_size=32)
    with pytest.raises(SpecError, match=r"data.image_size must be in \[8, 1024\]"):
        DataConfig(dataset=f"imagefolder:{cifar_dir}", image_size=4)
    res = _cli("train", "small_cnn", "--dataset", f"imagefolder:{cifar_dir / 'val'}", "--epochs", "1",
               "--out", str(tmp_path / "m.safetensors"))  # fmt: skip
    assert res.exit_code == 2 and "no train/ and val/ sub-folders" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "bad",
    ["64", {"size": [32]}, {"size": [0, 32], "crop_pct": 1.0, "interpolation": "bilinear"},
     {"size": [32, 32], "crop_pct": 0, "interpolation": "bilinear"},
     {"size": [32, 32], "crop_pct": 1.0, "interpolation": "lanczos"}],
)  # fmt: skip
def test_bad_preprocess_metadata_is_refused_in_one_line(tmp_path, bad):
    from robustse.core.errors import CheckpointError
    from robustse.models.checkpoint import load_checkpoint, save_checkpoint

    path = save_checkpoint(rs.create_model("small_cnn"), tmp_path / "m.safetensors", meta={"preprocess": bad})
    with pytest.raises(CheckpointError, match="metadata 'preprocess' must be"):
        load_checkpoint(path)


def test_folder_names_are_absolute_keep_links_and_refuse_unknown_users(cifar_dir, tmp_path, monkeypatch):
    """A checkpoint records the folder as an absolute path that leads where the given one led (a
    symbolic link not followed, `..` not collapsed: after a link it means the link target's
    parent); every spelling of one folder is one dataset; `~nouser/x` is a missing folder, not a
    crash."""
    from robustse.data.folder import absolute_name, dataset_identity
    from robustse.experiment.setup import load_test_split
    from robustse.experiment.sweep import SweepModel

    link = tmp_path / "link"
    link.symlink_to(cifar_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert absolute_name("imagefolder:link") == f"imagefolder:{link}"
    assert absolute_name("imagefolder:link/../link/") == f"imagefolder:{link}/../link"
    assert absolute_name("fashion-mnist") == "fashion-mnist" == dataset_identity("fashion-mnist")
    (cifar_dir.parent / "sibling").mkdir(exist_ok=True)  # link/.. is cifar_dir's parent, not tmp_path
    assert Path(absolute_name("imagefolder:link/../sibling")[len("imagefolder:") :]).is_dir()
    spellings = (
        "imagefolder:link",
        f"imagefolder:{link}/",
        f"imagefolder:{cifar_dir}",
        f"imagefolder:link/../{cifar_dir.name}",
    )
    assert {dataset_identity(n) for n in spellings} == {f"imagefolder:{cifar_dir.resolve()}"}
    models = [SweepModel(f"m{i}", torch.nn.Identity(), "", {"dataset": name})
              for i, name in enumerate(("imagefolder:link", f"imagefolder:{link}"))]  # fmt: skip
    assert len(load_test_split(models)) == len(load_image_folder(f"imagefolder:{cifar_dir}", "test"))
    with pytest.raises(DataError, match="no such folder"):
        load_image_folder("imagefolder:~no_such_user_robustse/x", "test")


def test_eval_and_inspect_take_timm_weights_as_arch_equals_weights(imagenet_dir, seresnet18_weights):
    """`eval` and `inspect` take foreign weights as sweep and drift do (ARCH=WEIGHTS); eval's class
    count defaults to the dataset's (the 1,000 of classes.txt), and its accuracy is the model's
    own predictions on the photos prepared per its pretrained config."""
    from robustse.data.folder import load_image_folder
    from robustse.models.checkpoint import load_checkpoint
    from robustse.training.predict import predict

    target = f"timm:seresnet18={seresnet18_weights}"
    res = _cli("--quiet", "eval", target, "--dataset", f"imagefolder:{imagenet_dir}", "--eval-subset", "6", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)["result"]
    model, _ = load_checkpoint(seresnet18_weights, arch="timm:seresnet18", arch_kwargs={"num_classes": 1000})
    ds = load_image_folder(f"imagefolder:{imagenet_dir}", "test", model.preprocess).subset(6)
    assert out["eval_examples"] == 6 and out["clean_accuracy"] == float((predict(model, ds) == ds.y).float().mean())
    res = _cli("inspect", target, "--num-classes", "1000", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)["result"]
    assert len(info["gates"]) == 8 and {g["type"] for g in info["gates"]} == {"Sigmoid"}
    bad = _cli("inspect", target)  # 10 classes by default: the 1,000-way head does not fit, in one line
    assert bad.exit_code == 2 and "does not fit timm:seresnet18" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_more_than_a_batch_of_photos_decode_in_worker_processes_in_order(cifar_dir, tmp_path, monkeypatch):
    """Past one 64-image batch the photos are decoded by DataLoader workers: the same pixels, in
    the listing's order, as one image at a time in this process; a bad photo among them is still
    one line naming it."""
    import torch.utils.data as tud

    import robustse.data.folder as folder
    from robustse.data.folder import prepare_image

    many = tmp_path / "many"
    for k in range(2):  # 80 photos: two copies of the 40 training photos under new names
        for f in (cifar_dir / "train").glob("*/*"):
            (many / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, many / f.parent.name / f"{k}_{f.name}")
    workers: list[int] = []
    loader = tud.DataLoader

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        workers.append(kwargs.get("num_workers", 0))
        return loader(*args, **kwargs)

    monkeypatch.setattr(folder.torch.utils.data, "DataLoader", counted)
    monkeypatch.setattr(folder.os, "cpu_count", lambda: 2)
    listing = load_image_folder(f"imagefolder:{many}", "test", Preprocess((32, 32), 1.0, "bilinear"))
    ds = listing.subset(None)
    assert len(ds) == 80 and workers == [2]
    one_by_one = torch.stack([prepare_image(f, listing.preprocess) for f in listing.files])
    assert torch.equal(ds.x, one_by_one)
    bad = sorted(many.glob("*/*"))[70]
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"{bad.name}: unreadable image"):
        load_image_folder(f"imagefolder:{many}", "test", listing.preprocess).subset(None)


def test_a_bad_photo_outside_the_selection_is_never_decoded(imagenet_dir, seresnet18_weights, tmp_path):
    """The fit check decodes two photos of the seeded selection itself: a corrupt photo the
    selection leaves out stops nothing (one inside it is one line, as tested above)."""
    from robustse.training.train import SUBSET_SEED

    broken = tmp_path / "broken"
    shutil.copytree(imagenet_dir, broken)
    listing = load_image_folder(f"imagefolder:{broken}", "test")
    chosen = set(listing.selection(3, seed=SUBSET_SEED).tolist())
    outside = min(set(range(len(listing))) - chosen)
    assert outside < 2  # among the first two in listing order
    listing.files[outside].write_bytes(b"not an image")
    res = _cli("--quiet", "eval", f"timm:seresnet18={seresnet18_weights}", "--dataset", f"imagefolder:{broken}",
               "--eval-subset", "3", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["result"]["eval_examples"] == 3


def test_weights_paths_may_hold_an_equals_sign(seresnet18_weights, tmp_path):
    """ARCH=WEIGHTS splits at the first "=" (architecture names have none; paths may)."""
    from robustse.cli import _arch_and_weights
    from robustse.experiment.setup import load_sweep_models

    assert _arch_and_weights("timm:resnet50=runs/lr=0.1/w.pth", None) == ("runs/lr=0.1/w.pth", "timm:resnet50")
    assert _arch_and_weights("ckpt.safetensors", "resnet20") == ("ckpt.safetensors", "resnet20")
    odd = tmp_path / "lr=0.1" / "w.safetensors"
    odd.parent.mkdir()
    shutil.copy(seresnet18_weights, odd)
    (sm,) = load_sweep_models([f"timm:seresnet18={odd}"], num_classes=1000)
    assert sm.checkpoint == str(odd) and len(rs.find_gates(sm.model)) == 8
