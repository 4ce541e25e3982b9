"""Checkpoints: safetensors weights with JSON metadata in the same file; safe loading only.

A robustse checkpoint is one ``.safetensors`` file whose header metadata holds, under the key
``robustse``, a JSON object: architecture and its kwargs, dataset, normalization, seed,
epochs, clean accuracy, a SHA-256 hash of the weights and library versions. Loading rebuilds
the architecture, checks every key and shape, and verifies the hash.

Foreign ``.pt``/``.pth`` files load only through ``torch.load(weights_only=True)``: a pickle
that carries code is refused, never run.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustse.core.errors import CheckpointError, ModelError, WriteError
from robustse.core.files import write_bytes
from robustse.core.provenance import library_versions
from robustse.core.types import PathLike
from robustse.models import create_model, model_arch
from robustse.models.external import Preprocess

FORMAT = "robustse-checkpoint/1"
META_KEY = "robustse"


def weight_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted names, dtypes, shapes and bytes of a state dict."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(model: nn.Module, path: PathLike, *, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights and metadata to ``path`` (atomically: never a half-written file).

    Args:
        model: a model built by :func:`robustse.create_model` (or pass ``arch``/``arch_kwargs`` in meta).
        path: target file, conventionally ``*.safetensors``.
        meta: extra JSON-serializable metadata (dataset, seed, epochs, clean_accuracy, ...).

    Returns:
        The path written.

    Example:
        >>> save_checkpoint(model, "models/se_cnn_s0.safetensors", meta={"seed": 0})  # doctest: +SKIP
    """
    from safetensors.torch import save

    path = Path(path)
    meta = dict(meta or {})
    if "arch" not in meta:
        arch, kwargs = model_arch(model)
        meta["arch"] = arch
        meta.setdefault("arch_kwargs", kwargs)
    meta.setdefault("arch_kwargs", {})
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    normalize = getattr(model, "normalize", None)
    if normalize is not None and "normalization" not in meta:
        meta["normalization"] = {"mean": normalize.mean.flatten().tolist(), "std": normalize.std.flatten().tolist()}
    meta.update(format=FORMAT, weight_hash=weight_hash(state), versions=library_versions())
    try:
        header = json.dumps(meta, sort_keys=True)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint metadata is not JSON-serializable: {exc}") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, save(state, metadata={META_KEY: header}))
    except (OSError, WriteError) as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint ({getattr(exc, 'strerror', None) or exc})") from None
    return path


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The robustse metadata of a checkpoint without loading its weights ({} if foreign)."""
    from safetensors import safe_open

    path = _existing(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_reason(exc)})") from None
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON") from None
    except RecursionError:
        raise CheckpointError(f"{path}: checkpoint metadata is nested too deeply to be robustse's") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
    _check_metadata(path, meta)
    return meta


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What the keys robustse reads from metadata must hold (absent is fine; None where noted).
_META_CHECKS: dict[str, tuple[Any, str]] = {
    "arch": (lambda v: isinstance(v, str), "a string"),
    "arch_kwargs": (lambda v: isinstance(v, dict), "a JSON object"),
    "dataset": (lambda v: isinstance(v, str), "a string"),
    "seed": (lambda v: _is_count(v) and 0 <= v < 2**63, "an integer >= 0"),
    "epochs": (lambda v: _is_count(v) and v >= 0, "an integer >= 0"),
    "train_examples": (lambda v: v is None or (_is_count(v) and v >= 1), "an integer >= 1"),
    "gate_means": (lambda v: v is None or _gate_means_ok(v), "{gate: [numbers]}"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of objects"),
    "weight_hash": (lambda v: isinstance(v, str), "a string"),
    "preprocess": (lambda v: _preprocess_ok(v), '{"size": [h, w], "crop_pct": (0, 1], "interpolation": ...}'),
}

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _preprocess_ok(v: object) -> bool:
    if not isinstance(v, dict) or set(v) != {"size", "crop_pct", "interpolation"}:
        return False
    size, crop = v["size"], v["crop_pct"]
    sides_ok = isinstance(size, list) and len(size) == 2 and all(_is_count(n) and 1 <= n <= 4096 for n in size)
    crop_ok = isinstance(crop, (int, float)) and not isinstance(crop, bool) and 0 < crop <= 1
    return sides_ok and crop_ok and v["interpolation"] in INTERPOLATIONS


def stored_preprocess(meta: dict[str, Any]) -> Preprocess | None:
    """The image-folder preparation recorded in (checked) metadata, None when there is none."""
    p = meta.get("preprocess")
    return None if p is None else Preprocess(tuple(p["size"]), float(p["crop_pct"]), p["interpolation"])


def _gate_means_ok(v: object) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(m, list) and m and all(isinstance(x, (int, float)) and math.isfinite(x)
                                                               and not isinstance(x, bool) for x in m)
        for k, m in v.items()
    )  # fmt: skip


def _check_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Refuse metadata whose keys hold the wrong kind of value (a list for ``dataset``, a string
    for ``seed`` or ``gate_means``...), with one line naming the key.

    Raises:
        CheckpointError: the first bad key.
    """
    for key, (ok, want) in _META_CHECKS.items():
        if key in meta and not ok(meta[key]):
            raise CheckpointError(f"{path}: checkpoint metadata {key!r} must be {want} (got {_short(meta[key])})")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_gate_means(path: PathLike, model: nn.Module, means: dict[str, list[float]]) -> None:
    """Refuse stored gate means that name no gate of ``model`` or have the wrong channel count.

    Raises:
        CheckpointError: naming the gate.
    """
    from robustse.models.gates import find_gates, gate_channels

    gates = find_gates(model)
    for name, values in means.items():
        if name not in gates:
            raise CheckpointError(f"{path}: metadata gate_means names {name!r}, which is not a gate of the model")
        channels = gate_channels(model, name)
        if channels is not None and len(values) != channels:
            raise CheckpointError(
                f"{path}: metadata gate_means[{name!r}] has {len(values)} values for {channels} channels"
            )


def load_checkpoint(
    path: PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint and load its weights safely.

    Args:
        path: a robustse ``.safetensors`` checkpoint, or a foreign ``.pt``/``.pth``/``.safetensors``
            state dict (then ``arch`` is required).
        arch: expected architecture; required for foreign files, checked against robustse metadata.
        arch_kwargs: builder options for a foreign file (e.g. ``{"num_classes": 10}``).
        map_location: device for the weights.

    Returns:
        ``(model in eval mode, metadata dict)``.

    Raises:
        CheckpointError: missing, truncated or corrupt file, hash mismatch, unsafe pickle, wrong
            architecture, missing/unexpected keys or shape mismatches (one line).
    """
    path = _existing(path)
    meta = read_metadata(path)
    state = _load_safetensors(path) if path.suffix == ".safetensors" else _load_pickle_weights_only(path)
    _check_tensors(path, state)
    if meta:
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} (expected {FORMAT})")
        if arch is not None and arch != meta.get("arch"):
            raise CheckpointError(f"{path}: checkpoint is for {meta.get('arch')!r}, not {arch!r}")
        if weight_hash(state) != meta.get("weight_hash"):
            raise CheckpointError(f"{path}: weights do not match their recorded hash (file corrupted or edited)")
        if not isinstance(meta.get("arch"), str) or not isinstance(meta.get("arch_kwargs", {}), dict):
            raise CheckpointError(f"{path}: checkpoint metadata lacks a valid 'arch' / 'arch_kwargs'")
        arch, kwargs = meta["arch"], dict(meta.get("arch_kwargs", {}))
    else:
        if arch is None:
            raise CheckpointError(f"{path}: foreign checkpoint without robustse metadata: pass --arch NAME")
        kwargs = dict(arch_kwargs or {})
        meta = {"arch": arch, "arch_kwargs": kwargs, "foreign": True}
    if not meta.get("foreign"):
        _check_size_before_building(path, arch, kwargs, state)
    try:
        model = create_model(arch, **kwargs)
    except (ModelError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model: {exc}") from None
    state = _fit_keys(model, state)
    _check_fits(path, arch, model, state, partial_ok=bool(meta.get("foreign")))
    if meta.get("gate_means"):
        check_gate_means(path, model, meta["gate_means"])
    model.load_state_dict(state, strict=not meta.get("foreign"))
    if (prepared := stored_preprocess(meta)) is not None:  # trained on an image folder: its photos' preparation
        object.__setattr__(model, "preprocess", prepared)
    model.to(map_location)
    model.eval()
    return model, meta


# --------------------------------------------------------------------------- helpers


def _check_size_before_building(path: Path, arch: str, kwargs: dict[str, Any], state: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors cannot fill ``arch`` before the model is built for real:
    the architecture is built on the ``meta`` device (no memory, the global RNG untouched), so
    metadata naming a huge model beside a small file costs nothing (README "Reliability")."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            expected = sum(t.numel() for t in create_model(arch, **kwargs).state_dict().values())
    except Exception:  # noqa: BLE001 - a builder the meta device cannot run: the real build checks
        return
    held = sum(t.numel() for t in state.values())
    if expected != held:
        raise CheckpointError(
            f"{path}: the checkpoint holds {held:,} values but {arch} has {expected:,}: "
            "refused before building the model"
        )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    return path


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_reason(exc)})") from None


def _load_pickle_weights_only(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: the error below says enough
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: the pickle holds objects other than tensors and plain containers "
            "(it may carry code); only weights_only loading is allowed"
        ) from None
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: corrupt or unreadable torch file ({_reason(exc)})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def _check_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights that are not dense real tensors (sparse, complex, quantized...): copying them
    into a model fails deep inside torch, or silently drops the imaginary part.

    Raises:
        CheckpointError: naming the first such tensor.
    """
    for key, t in state.items():
        if t.layout != torch.strided or t.is_complex() or t.is_quantized:
            kind = "complex" if t.is_complex() else "quantized" if t.is_quantized else str(t.layout).split(".")[-1]
            raise CheckpointError(f"{path}: tensor {key!r} is {kind}; robustse loads dense real weights only")


def _fit_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a bare torchvision state dict for a wrapped ``torchvision:`` model (keys under ``net.``)."""
    own = model.state_dict()
    net = getattr(model, "net", None)
    if net is not None and state and not any(k in own for k in state):
        prefixed = {f"net.{k}": v for k, v in state.items()}
        if all(k in own for k in prefixed):
            return {**{k: v for k, v in own.items() if k.startswith("normalize.")}, **prefixed}
    return state


def _check_fits(path: Path, arch: str, model: nn.Module, state: dict[str, torch.Tensor], *, partial_ok: bool) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not (partial_ok and k.startswith("normalize."))]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    if problems:
        raise CheckpointError(f"{path}: does not fit {arch}: " + "; ".join(problems))
