"""Dataset registry: image classification data held in memory as uint8 tensors.

Every dataset loads to a :class:`Dataset` with ``x`` uint8 of shape (N, C, H, W) and
``y`` int64 of shape (N,). Pixels are converted to floats in [0, 1] per batch by the
consumer (:func:`to_float`); normalization lives inside the model.

``imagefolder:<DIR>`` names a folder of full-size images in class sub-folders, decoded only
where a command selects them (:mod:`robustse.data.folder`).

``fashion-mnist`` is the embedded default: it is read directly from the four standard
IDX ``.gz`` files (Debian package ``dataset-fashion-mnist``, ``$ROBUSTSE_DATA`` or
``--data-root``). ``mnist``, ``cifar10`` and ``svhn`` go through torchvision from local
files or with ``download=True``.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from robustse.core.errors import DataError
from robustse.core.registry import Registry
from robustse.data.base import Dataset, Split

if TYPE_CHECKING:
    from robustse.data.folder import ImageFolder
    from robustse.models.external import Preprocess

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (as root), "
    "set ROBUSTSE_DATA to a folder holding the four IDX .gz files, or pass --data-root DIR"
)


# --------------------------------------------------------------------------- registry

Builder = Callable[[Split, "Path | None", bool], Dataset]


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: its loader and what augmentation keeps its labels."""

    name: str
    builder: Builder
    hflip: bool
    description: str


_REGISTRY: Registry[DatasetInfo] = Registry("dataset", DataError)


def register_dataset(name: str, *, hflip: bool, description: str) -> Callable[[Builder], Builder]:
    """Register a loader ``fn(split, root, download) -> Dataset`` under ``name``."""

    def deco(fn: Builder) -> Builder:
        _REGISTRY.add(name, DatasetInfo(name, fn, hflip, description))
        return fn

    return deco


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names matching a glob pattern."""
    return _REGISTRY.names(pattern)


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name``.

    Raises:
        DataError: unknown name, listing the valid ones.
    """
    return _REGISTRY.get(name)


def flips_keep_labels(name: str) -> bool:
    """Whether a horizontal flip keeps an image's class (training augmentation): the registry's
    word for a registered dataset; photos in an image folder: yes."""
    from robustse.data.folder import is_image_folder

    return is_image_folder(name) or dataset_info(name).hflip


def load_dataset(
    name: str,
    *,
    split: Split = "test",
    root: str | Path | None = None,
    download: bool = False,
) -> Dataset:
    """Load a dataset split into memory.

    Args:
        name: registry name, e.g. ``fashion-mnist``.
        split: ``train`` or ``test``.
        root: folder with the data files; default: the dataset's usual places.
        download: allow torchvision to download missing files.

    Returns:
        The split as a :class:`Dataset`.

    Raises:
        DataError: unknown dataset or split, files missing (naming where it looked) or malformed.

    Example:
        >>> ds = load_dataset("fashion-mnist", split="test")  # doctest: +SKIP
        >>> ds.x.shape, ds.classes[0]  # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), 'T-shirt/top')
    """
    split_or_listing = load_split(name, split=split, root=root, download=download)
    return split_or_listing if isinstance(split_or_listing, Dataset) else split_or_listing.subset(None)


def load_split(
    name: str,
    *,
    split: Split = "test",
    root: str | Path | None = None,
    download: bool = False,
    preprocess: Preprocess | None = None,
) -> Dataset | ImageFolder:
    """A registered dataset's split in memory, or the listing of an ``imagefolder:<DIR>`` split
    (:mod:`robustse.data.folder`), whose ``subset``/``held_out`` decode only the images they select.

    Args:
        name: as for :func:`load_dataset`.
        split: as for :func:`load_dataset`.
        root: as for :func:`load_dataset`.
        download: as for :func:`load_dataset`.
        preprocess: how an image folder's images are resized and cropped (the model's).

    Raises:
        DataError: as for :func:`load_dataset`, and a bad image folder.
    """
    from robustse.data.folder import is_image_folder, load_image_folder

    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r} (valid: train, test)")
    if is_image_folder(name):
        return load_image_folder(name, split, preprocess)
    return dataset_info(name).builder(split, Path(root) if root is not None else None, download)


# --------------------------------------------------------------------------- IDX files


_IDX_DTYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array.

    Raises:
        DataError: bad magic number, truncated or unreadable file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX payload has {len(data) - header} bytes, header says {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed if ``path`` ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(payload)


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(bases: list[Path], stem: str) -> Path | None:
    for base in bases:
        for folder in (base, base / "fashion-mnist", base / "FashionMNIST" / "raw"):
            for name in (stem + ".gz", stem):
                if (folder / name).is_file():
                    return folder / name
    return None


def _load_idx_pair(name: str, split: Split, bases: list[Path], classes: tuple[str, ...], hint: str) -> Dataset:
    img_stem, lbl_stem = _IDX_FILES[split]
    found = [_find_idx(bases, stem) for stem in (img_stem, lbl_stem)]
    if found[0] is None or found[1] is None:
        missing = img_stem if found[0] is None else lbl_stem
        where = ", ".join(str(b) for b in bases) or "(nowhere)"
        raise DataError(f"{name}: {missing}.gz not found in {where}; {hint}")
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{name}: {found[0].name} {images.shape} does not match {found[1].name} {labels.shape}")
    if labels.dtype.kind not in "ui":
        raise DataError(f"{name}: {found[1].name} holds {labels.dtype} labels; class labels are integers")
    if labels.size and (int(labels.max()) >= len(classes) or int(labels.min()) < 0):
        bad = int(labels.max()) if int(labels.max()) >= len(classes) else int(labels.min())
        raise DataError(f"{name}: label {bad} out of range for {len(classes)} classes")
    x = torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)  # (N, 1, H, W)
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(name, split, x, y, classes)


FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _default_root() -> Path:
    return Path(os.environ.get("ROBUSTSE_DATA", "data"))


@register_dataset("fashion-mnist", hflip=True, description="Fashion-MNIST 28x28 grey, 10 classes (embedded default)")
def _fashion_mnist(split: Split, root: Path | None, download: bool) -> Dataset:
    if root is not None:
        bases = [root]
    else:
        bases = [Path(p) for p in [os.environ.get("ROBUSTSE_DATA")] if p] + [DEBIAN_FASHION_MNIST]
    if download and _find_idx(bases, _IDX_FILES[split][0]) is None:
        target = root or _default_root()
        _torchvision_call(
            "fashion-mnist", target, lambda tv: tv.FashionMNIST(str(target), train=split == "train", download=True)
        )
        bases = [target]
    return _load_idx_pair("fashion-mnist", split, bases, FASHION_CLASSES, FASHION_MNIST_HINT)


# --------------------------------------------------------------------------- torchvision datasets


def _torchvision_call(name: str, root: Path, make: Callable[..., Any]) -> Any:
    """Run a torchvision dataset constructor, turning its errors into one-line DataErrors."""
    import torchvision.datasets as tvd

    try:
        return make(tvd)
    except RuntimeError as exc:
        text = " ".join(str(exc).split()) or exc.__class__.__name__
        reason = text.split(". ")[0].rstrip(".")  # drop torchvision's "You can use download=True" advice
        raise DataError(f"{name}: {reason} under {root}; pass --data-root DIR or --download") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{name}: cannot read files under {root} ({exc.__class__.__name__}: {exc})") from None


@register_dataset("mnist", hflip=False, description="MNIST digits 28x28 grey, 10 classes (torchvision)")
def _mnist(split: Split, root: Path | None, download: bool) -> Dataset:
    root = root or _default_root()
    ds = _torchvision_call("mnist", root, lambda tv: tv.MNIST(str(root), train=split == "train", download=download))
    x = ds.data.to(torch.uint8).unsqueeze(1)
    y = ds.targets.to(torch.int64)
    return Dataset("mnist", split, x.contiguous(), y, tuple(str(i) for i in range(10)))


CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@register_dataset("cifar10", hflip=True, description="CIFAR-10 32x32 colour, 10 classes (torchvision)")
def _cifar10(split: Split, root: Path | None, download: bool) -> Dataset:
    root = root or _default_root()
    ds = _torchvision_call("cifar10", root, lambda tv: tv.CIFAR10(str(root), train=split == "train", download=download))
    x = torch.from_numpy(np.asarray(ds.data, dtype=np.uint8)).permute(0, 3, 1, 2)  # (N,H,W,C) → (N,C,H,W)
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    return Dataset("cifar10", split, x.contiguous(), y, CIFAR10_CLASSES)


@register_dataset("svhn", hflip=False, description="SVHN house numbers 32x32 colour, 10 classes (torchvision)")
def _svhn(split: Split, root: Path | None, download: bool) -> Dataset:
    root = root or _default_root()
    ds = _torchvision_call("svhn", root, lambda tv: tv.SVHN(str(root), split=split, download=download))
    x = torch.from_numpy(np.asarray(ds.data, dtype=np.uint8))  # already (N, C, H, W)
    y = torch.as_tensor(np.asarray(ds.labels), dtype=torch.int64)
    return Dataset("svhn", split, x.contiguous(), y, tuple(str(i) for i in range(10)))
