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
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._types import PathLike
from .errors import CheckpointError, ModelError
from .models import create_model, model_arch
from .provenance import library_versions

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
    from safetensors.torch import save_file

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
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(state, str(tmp), metadata={META_KEY: header})
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint ({exc.strerror or exc})") from None
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
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
    return meta


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
    try:
        model = create_model(arch, **kwargs)
    except (ModelError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model: {exc}") from None
    state = _fit_keys(model, state)
    _check_fits(path, arch, model, state, partial_ok=bool(meta.get("foreign")))
    model.load_state_dict(state, strict=not meta.get("foreign"))
    model.to(map_location)
    model.eval()
    return model, meta


# --------------------------------------------------------------------------- helpers


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
