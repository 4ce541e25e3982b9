"""Dataset registry: image classification data held in memory as uint8 tensors.

Every dataset loads to a :class:`Dataset` with ``x`` uint8 of shape (N, C, H, W) and
``y`` int64 of shape (N,). Pixels are converted to floats in [0, 1] per batch by the
consumer (:func:`to_float`); normalization lives inside the model.

``imagefolder:<DIR>`` names a folder of full-size images in class sub-folders, decoded only
where a command selects them (:mod:`robustse.folder`).

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
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .errors import DataError
from .registry import Registry

if TYPE_CHECKING:
    from .folder import ImageFolder
    from .models.external import Preprocess

Split = Literal["train", "test"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (as root), "
    "set ROBUSTSE_DATA to a folder holding the four IDX .gz files, or pass --data-root DIR"
)


@dataclass(frozen=True)
class Dataset:
    """An in-memory split of an image classification dataset.

    Attributes:
        name: registry name.
        split: ``train`` or ``test``.
        x: uint8 images, (N, C, H, W).
        y: int64 labels, (N,).
        classes: class names, index = label.
    """

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise DataError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise DataError(f"{self.name}: {self.x.shape[0]} images but labels of shape {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x.shape[2]), int(self.x.shape[3])

    def subset(self, n: int | None, *, seed: int = 0) -> Dataset:
        """A deterministic random subset of ``n`` examples (original order kept).

        ``None`` or ``n >= len(self)`` returns the whole dataset.

        Raises:
            DataError: if ``n < 1``.
        """
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise DataError(f"{self.name}/{self.split}: subset size must be >= 1 (got {n})")
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=gen)[:n].sort().values
        return Dataset(self.name, self.split, self.x[idx], self.y[idx], self.classes)

    def held_out(self, n: int | None, *, seed: int = 0, size: int = 2000) -> Dataset | None:
        """Up to ``size`` examples that ``subset(n, seed=seed)`` leaves out (original order kept);
        None when that subset is the whole split."""
        if n is None or n >= len(self):
            return None
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=gen)[n : n + size].sort().values
        return Dataset(self.name, self.split, self.x[idx], self.y[idx], self.classes)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and (sample) std of the pixels in [0, 1] (for the model's Normalize
        layer), summed over chunks of 1,024 images so a large set is never converted whole."""
        total = torch.zeros(2, self.in_channels, dtype=torch.float64)  # sums of x and x²
        for i in range(0, len(self), 1024):
            x = self.x[i : i + 1024].to(torch.float64) / 255.0
            total += torch.stack([x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))])
        n = len(self) * self.image_size[0] * self.image_size[1]
        mean = total[0] / n
        std = ((total[1] - n * mean.square()) / max(n - 1, 1)).clamp_min(0).sqrt().clamp_min(1e-6)
        return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [0, 1]."""
    return x.to(torch.float32).div_(255.0)


FORWARD_PIXELS = 1 << 21  # image pixels per forward-only pass: ≈ 41 images at 224², the cap at 28²


def forward_rows(x: torch.Tensor, cap: int) -> int:
    """Images per forward-only pass (prediction, calibration, gate means) over the images ``x``
    (N, C, H, W): ``cap``, fewer for large images, so a pass's activations stay about the same
    size whatever the resolution (about 1 GiB at 224² for a ResNet-50)."""
    return max(1, min(cap, FORWARD_PIXELS // max(1, x.shape[-1] * x.shape[-2])))


def as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [0, 1]; float images as they are."""
    return to_float(x) if x.dtype == torch.uint8 else x


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
    from .folder import is_image_folder

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
    (:mod:`robustse.folder`), whose ``subset``/``held_out`` decode only the images they select.

    Args:
        name, split, root, download: as for :func:`load_dataset`.
        preprocess: how an image folder's images are resized and cropped (the model's).

    Raises:
        DataError: as for :func:`load_dataset`, and a bad image folder.
    """
    from .folder import is_image_folder, load_image_folder

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
