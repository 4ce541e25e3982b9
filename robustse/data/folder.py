"""``imagefolder:<DIR>`` datasets: full-size photos in class sub-folders, decoded on demand.

The folder is listed, never read whole: :class:`ImageFolder` knows each image's path and label,
and only the images a command evaluates (its seeded subset, its held-out calibration images)
are decoded, resized and centre-cropped per the model's :class:`~robustse.models.external.Preprocess`
(the shorter side to ``size / crop_pct``, then the centre ``size``), streamed in batches through
a DataLoader with worker processes, into a uint8 :class:`~robustse.data.Dataset`: in memory up
to 1 GiB, beyond that in a memory-mapped scratch file the OS pages in and out, so a large
selection never has to fit in RAM (README "Datasets": "Image folders").

Labels: the class index of an image is the position of its sub-folder's name in sorted order,
or in ``DIR/classes.txt`` (one name per line, e.g. the 1,000 ImageNet synsets in the order the
model's outputs use) when that file exists. A folder with ``train/`` and ``val/`` (or ``test/``)
sub-folders has both splits; any other folder is a test split only.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from robustse.core.errors import DataError
from robustse.core.progress import Progress
from robustse.data.base import Dataset, Split
from robustse.models.external import Preprocess

PREFIX = "imagefolder:"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IN_MEMORY_BYTES = 1 << 30  # decoded images (uint8) up to 1 GiB are held in memory; more go to a scratch file
SCRATCH_SPARE = 1 << 30  # free space a scratch file leaves on its disk
CLASS_LIST = "classes.txt"
TRAIN_SIZE = 64  # the default side of the images robustse's own models train on


def training_preprocess(size: int | None) -> Preprocess:
    """How an image folder is prepared for training robustse's own models (and evaluating them):
    the shorter side resized to ``size`` (default 64), then the centre square, the whole photo's
    content kept as downsampled-ImageNet sets do (Chrabaszcz et al. 2017, arXiv:1707.08819)."""
    side = size or TRAIN_SIZE
    return Preprocess((side, side), 1.0, "bilinear")


def is_image_folder(name: str) -> bool:
    """Whether a dataset name is ``imagefolder:<DIR>``."""
    return name.startswith(PREFIX)


class ImageFolder:
    """The listing of one split of an image folder: paths and labels, no pixels.

    Attributes:
        name: ``imagefolder:<DIR>`` as given.
        split: ``train`` or ``test``.
        files: image paths, sorted by class then file name.
        y: int64 labels, (N,).
        classes: class names, index = label.
        preprocess: how images are resized and cropped.
    """

    def __init__(self, name: str, split: str, files: list[Path], y: torch.Tensor, classes: tuple[str, ...],
                 preprocess: Preprocess) -> None:  # fmt: skip
        self.name, self.split, self.files, self.y = name, split, files, y
        self.classes, self.preprocess = classes, preprocess

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return 3

    def subset(self, n: int | None, *, seed: int = 0) -> Dataset:
        """The seeded subset of ``n`` images (the same selection as :meth:`Dataset.subset`), decoded.

        Raises:
            DataError: ``n < 1``, an unreadable image, or more decoded pixels than allowed.
        """
        return self.decode(self.selection(n, seed=seed))

    def selection(self, n: int | None, *, seed: int = 0) -> torch.Tensor:
        """The sorted indices :meth:`subset` decodes.

        Raises:
            DataError: ``n < 1``.
        """
        if n is not None and n < 1:
            raise DataError(f"{self.name}/{self.split}: subset size must be >= 1 (got {n})")
        if n is None or n >= len(self):
            return torch.arange(len(self))
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(len(self), generator=gen)[:n].sort().values

    def held_out(self, n: int | None, *, seed: int = 0, size: int = 2000) -> Dataset | None:
        """Up to ``size`` images that ``subset(n, seed=seed)`` leaves out, decoded; None when
        that subset is the whole split."""
        if n is None or n >= len(self):
            return None
        gen = torch.Generator().manual_seed(seed)
        return self.decode(torch.randperm(len(self), generator=gen)[n : n + size].sort().values)

    def decode(self, idx: torch.Tensor) -> Dataset:
        """The images at ``idx``, decoded and preprocessed in worker processes, as a uint8 Dataset:
        in memory up to ``IN_MEMORY_BYTES``, beyond that in a memory-mapped scratch file
        (:func:`scratch_images`).

        Raises:
            DataError: an unreadable image (naming it), or no room for the scratch file.
        """
        x = self._buffer(len(idx))
        files = [self.files[i] for i in idx.tolist()]
        done = 0
        with Progress(len(files), f"decode {self.split}", unit="image") as bar:
            for images, errors in _loader(files, self.preprocess):
                bad = next((e for e in errors if e), None)
                if bad:
                    raise DataError(bad)
                x[done : done + len(images)] = images
                done += len(images)
                bar.update(len(images))
        return Dataset(self.name, self.split, x, self.y[idx].clone(), self.classes)

    def _buffer(self, n: int) -> torch.Tensor:
        h, w = self.preprocess.size
        if n * 3 * h * w <= IN_MEMORY_BYTES:
            return torch.empty(n, 3, h, w, dtype=torch.uint8)
        try:
            return scratch_images((n, 3, h, w))
        except DataError as exc:
            raise DataError(f"{self.name}: {n} images of 3x{h}x{w}: {exc}; {self._fewer()}") from None

    def _fewer(self) -> str:
        if self.split == "train":
            return "train on a smaller subset (--train-subset, [data] train_subset) or smaller images"
        return "evaluate a smaller subset (--eval-subset)"


def scratch_images(shape: tuple[int, int, int, int]) -> torch.Tensor:
    """A uint8 tensor of ``shape`` backed by a file in ``$TMPDIR`` (the system's temporary folder
    when unset; a ``$TMPDIR`` that cannot hold the file is an error, not silently replaced) whose
    name is removed before anything is written to it and whose blocks are allocated up front: the
    pages live in the OS's page cache, which the kernel writes back and evicts under memory
    pressure, and the file disappears with the tensor (or the process, even a killed one).

    Raises:
        DataError: the folder lacks room for the file plus ``SCRATCH_SPARE``, or cannot hold it.
    """
    need = math.prod(shape)
    folder = os.environ.get("TMPDIR") or tempfile.gettempdir()
    fd = _nameless_file(folder, need)
    try:
        _allocate(fd, need)
        pages = mmap.mmap(fd, need)  # shared with the file; the tensor keeps the mapping alive
        return torch.frombuffer(pages, dtype=torch.uint8).view(shape)
    except (OSError, ValueError) as exc:  # no room, or no mapping (an address-space limit)
        raise DataError(f"cannot make a {need / 2**30:.1f} GiB scratch file in {folder} ({_reason(exc)})") from None
    finally:
        os.close(fd)


def _nameless_file(folder: str, need: int) -> int:
    """An open file in ``folder``, its name already removed, once the folder has room for ``need``
    bytes plus ``SCRATCH_SPARE``."""
    try:
        free = shutil.disk_usage(folder).free
        if need + SCRATCH_SPARE <= free:
            fd, path = tempfile.mkstemp(prefix="robustse-images-", suffix=".u8", dir=folder)
            os.unlink(path)
            return fd
    except OSError as exc:  # not a folder, or not writable
        raise DataError(f"cannot make a scratch file in {folder} ({_reason(exc)})") from None
    raise DataError(
        f"{need / 2**30:.1f} GiB decoded need a scratch file in {folder}, which has {free / 2**30:.1f} GiB free "
        "(set TMPDIR to a larger disk)"
    )


def _reason(exc: Exception) -> str:
    """An OS error's own words (its strerror), else the first line of its message."""
    return getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]


def absolute_name(name: str) -> str:
    """``imagefolder:<DIR>`` with DIR made absolute (what a checkpoint records, so later commands
    find the folder from any working directory): prefixed with the working directory, nothing
    else changed (a symbolic link is not followed and ``..`` not collapsed, so the name leads to
    the folder the OS opened); other names as they are."""
    return PREFIX + str(Path.cwd() / folder_root(name)) if is_image_folder(name) else name


def dataset_identity(name: str) -> str:
    """What makes two dataset names the same dataset: an image folder's real path (every
    spelling of one folder, relative, absolute or through links, is one dataset); other names
    as they are."""
    return PREFIX + os.path.realpath(folder_root(name)) if is_image_folder(name) else name


def folder_root(name: str) -> Path:
    """The folder of ``imagefolder:<DIR>``, ``~`` expanded (an unknown ``~user`` is left as written)."""
    return Path(os.path.expanduser(name[len(PREFIX) :]))


def _allocate(fd: int, size: int) -> None:
    """Give the file ``size`` bytes of real blocks (a full disk is an error now, not a SIGBUS
    later); where the OS has no ``posix_fallocate`` (macOS), a sparse file of that size."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:
        os.ftruncate(fd, size)


def load_image_folder(name: str, split: Split, preprocess: Preprocess | None = None) -> ImageFolder:
    """List ``imagefolder:<DIR>``'s ``split`` (no image is read yet).

    Raises:
        DataError: not a folder, a sub-folder that cannot be listed, no class sub-folders, no
            images, a sub-folder missing from ``classes.txt`` or a name listed twice in it, or a
            split the folder does not have.
    """
    root = folder_root(name)
    try:
        if not root.is_dir():
            raise DataError(f"{name}: no such folder")
        folder = _split_folder(name, root, split)
        classes = _class_list(name, root, _split_folders(root) or [folder])
        files, labels = _list_images(name, folder, classes)
    except OSError as exc:  # a sub-folder that cannot be listed (permissions, a dangling mount)
        raise DataError(f"{name}: cannot list {exc.filename or 'a sub-folder'} ({exc.strerror or exc})") from None
    return ImageFolder(name, split, files, torch.tensor(labels, dtype=torch.int64), classes, preprocess or Preprocess())


def _split_folders(root: Path) -> list[Path]:
    """``[train, val]`` (or ``[train, test]``) when ``root`` has both, else ``[]``."""
    subs = {p.name for p in root.iterdir() if p.is_dir()}
    test = next((s for s in ("val", "test") if s in subs), None)
    return [root / "train", root / test] if "train" in subs and test else []


def _split_folder(name: str, root: Path, split: Split) -> Path:
    splits = _split_folders(root)
    if splits:
        return splits[0] if split == "train" else splits[1]
    if split == "train":
        raise DataError(f"{name}: no train/ and val/ sub-folders, so no training split (it is a test split only)")
    return root


def _class_list(name: str, root: Path, folders: list[Path]) -> tuple[str, ...]:
    """The class names: ``classes.txt``, else the class sub-folders of every split, sorted (so a
    class missing from one split does not shift the other classes' labels)."""
    found = sorted({p.name for f in folders for p in f.iterdir() if p.is_dir() and not p.name.startswith(".")})
    if not found:
        raise DataError(f"{name}: {folders[-1]} has no class sub-folders (expected <class>/<image> files)")
    listed = root / CLASS_LIST
    if not listed.is_file():
        return tuple(found)
    try:
        classes = tuple(line.strip() for line in listed.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{listed}: cannot read the class list ({exc})") from None
    twice = sorted(c for c, k in Counter(classes).items() if k > 1)
    if twice:  # two labels for one folder
        raise DataError(f"{listed}: class {twice[0]!r} is listed more than once")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{name}: sub-folder {unknown[0]!r} is not in {CLASS_LIST} ({len(classes)} classes)")
    return classes


def _list_images(name: str, folder: Path, classes: tuple[str, ...]) -> tuple[list[Path], list[int]]:
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name in index):
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(index[sub.name])
    if not files:
        raise DataError(f"{name}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class sub-folders of {folder}")
    return files, labels


# --------------------------------------------------------------------------- decoding


class _Decode(torch.utils.data.Dataset):
    """Decode + resize + centre-crop one image; an unreadable one yields an error message
    (raised by the main process as one line, not as a worker traceback)."""

    def __init__(self, files: list[Path], preprocess: Preprocess) -> None:
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return prepare_image(self.files[i], self.preprocess), ""
        except Exception as exc:  # corrupt, truncated, not an image, unreadable
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            blank = torch.zeros(3, *self.preprocess.size, dtype=torch.uint8)
            return blank, f"{self.files[i]}: unreadable image ({reason})"


def prepare_image(path: Path, preprocess: Preprocess) -> torch.Tensor:
    """One image file → uint8 (3, H, W) as the model wants it: RGB, the shorter side resized
    to ``size / crop_pct`` (Pillow resampling, as timm's and torchvision's eval transforms do),
    then the centre ``size``."""
    from PIL import Image
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as img:
        rgb = _eight_bit(img).convert("RGB")
    if min(rgb.size) < 2:
        raise ValueError(f"{rgb.size[0]}x{rgb.size[1]} pixels is too small to resize")
    h, w = preprocess.size
    scale = int(min(h, w) / preprocess.crop_pct)
    resized = F.resize(rgb, [scale], interpolation=InterpolationMode(preprocess.interpolation))
    return F.pil_to_tensor(F.center_crop(resized, [h, w]))


def _eight_bit(img: Any) -> Any:
    """A Pillow image whose pixels ``convert("RGB")`` reads right: 16-bit greyscale (``I;16*``, or
    ``I`` from a PNG, as older Pillow opens 16-bit PNGs) scaled to 8 bits (65535 → 255; Pillow's own
    conversion clips it, turning mid-grey white); other 32-bit integer or float pixels (``I``,
    ``F``), whose range the file does not state, refused."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        wide = np.asarray(img, dtype=np.uint16).astype(np.float64)
        return Image.fromarray(np.round(wide / 257.0).astype(np.uint8), mode="L")
    if img.mode in ("I", "F"):
        raise ValueError(
            f"{img.mode}-mode pixels (32-bit) have no fixed range; save the image with 8 or 16 bits per channel"
        )
    return img


def _loader(files: list[Path], preprocess: Preprocess, batch_size: int = 64) -> Any:
    """Batches of (images, error messages) decoded by up to 4 worker processes."""
    workers = 0 if len(files) <= batch_size else min(4, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(_Decode(files, preprocess), batch_size=batch_size, num_workers=workers)
