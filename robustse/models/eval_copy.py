"""An eval-mode copy of a model for the attacks' gradient passes: the same function up to float
rounding, with cheaper kernels (README "Performance": the attack path).

In eval mode a batch norm is a fixed per-channel affine map, yet its backward pass still runs the
general kernel. The copy folds each batch norm into the convolution right before it in an
``nn.Sequential`` (Ioffe & Szegedy 2015 give the eval-mode map; the fold is
:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`), turns every other one into a per-channel
multiply-add, and on request holds 4-d weights in channels_last layout. Measured on a 2-core CPU
(``benchmarks/layout_speed.py``: one input-gradient pass, batch 250, 28x28): 1.8-2.3x for the
``small_cnn`` family.

Everything else is shared with the model, so hooks registered on its modules (a probe's, an
intervention's, a sweep's check) still fire. A batch norm or convolution that carries hooks of its
own is left as it is, and the layout is left alone when a module inside the model has hooks not
marked :func:`any_layout`: a hook may rely on its tensors' strides. (Hooks on the model itself see
its input, which keeps its layout, and its logits.)
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_ANY_LAYOUT = "_robustse_any_layout"


def any_layout(hook: Any) -> Any:
    """Mark a module hook as indifferent to memory layout (it never relies on strides), so
    :func:`eval_copy` may still use channels_last weights while it is registered."""
    setattr(hook, _ANY_LAYOUT, True)
    return hook


class EvalAffine(nn.Module):
    """An eval-mode batch norm as ``x * scale + shift`` per channel (one fused kernel each way)."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        assert bn.running_mean is not None and bn.running_var is not None
        dtype = bn.running_mean.dtype
        wide = torch.promote_types(dtype, torch.float32)  # half-precision statistics: fold in float32
        with torch.no_grad():
            var, mean = bn.running_var.to(wide), bn.running_mean.to(wide)
            scale = torch.rsqrt(var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.to(wide)
            shift = -mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias.to(wide)
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("shift", shift.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # (1, C, 1, 1) for images
        # x's dtype, as a batch norm keeps it (float32 statistics in a half-precision model)
        return torch.addcmul(self.shift.view(shape).to(x.dtype), x, self.scale.view(shape).to(x.dtype))


def eval_copy(model: nn.Module, *, channels_last: bool = False) -> nn.Module:
    """``model`` with its eval-mode batch norms folded or made affine (see the module docstring).

    Call it with ``model`` in eval mode and use the copy only while the model is unchanged: folded
    weights are computed once. Modules without a batch norm below them are the model's own.

    Args:
        model: the model, in eval mode.
        channels_last: hold 4-d weights in channels_last layout (not while a module inside the
            model has hooks that are not marked :func:`any_layout`).

    Returns:
        The copy, or ``model`` itself where nothing changes (or it is scripted or wrapped for
        data parallelism, whose internals a shallow copy would not follow).
    """
    if _opaque(model):
        return model
    layout = channels_last and all(_layout_free(m) for m in model.modules() if m is not model)
    return _copy(model, layout)


def copy_for(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The eval copy of ``model`` for passes of ``x``: channels_last for images on a CPU (where it
    was measured faster), unless the model's own code needs the default layout
    (:func:`in_default_layout_if_needed` found it out); with a compiled forward inside
    ``reusing_copies(compiled=True)``."""
    layout = x.device.type == "cpu" and x.dim() == 4 and model not in _DEFAULT_LAYOUT
    reuse = _REUSED.get()
    if reuse is None:
        return eval_copy(model, channels_last=layout)
    key = (id(model), layout)
    if key not in reuse.copies:
        made = eval_copy(model, channels_last=layout)
        made = with_compiled_forward(made) if reuse.compiled and not _opaque(made) else made
        reuse.copies[key] = (model, made)  # the model held: its id stays its own
    return reuse.copies[key][1]


@dataclass
class _Reuse:
    copies: dict[tuple[int, bool], tuple[nn.Module, nn.Module]]
    compiled: bool


_REUSED: ContextVar[_Reuse | None] = ContextVar("_REUSED", default=None)


@contextlib.contextmanager
def reusing_copies(*, compiled: bool = False) -> Iterator[None]:
    """Inside the block, :func:`copy_for` builds one copy per model and layout and returns it
    again, instead of a new copy per call. Only for a caller that keeps each model unchanged
    meanwhile: its weights, its modules and the hooks on its batch norms and convolutions (a
    sweep attacking and probing one model, whose own hooks sit on gates and blocks, which the copy
    shares).

    Args:
        compiled: give each copy a compiled forward (:func:`with_compiled_forward`).
    """
    token = _REUSED.set(_Reuse({}, compiled))
    try:
        yield
    finally:
        _REUSED.reset(token)


def with_compiled_forward(module: nn.Module) -> nn.Module:
    """``module`` with its forward run through ``torch.compile`` (inductor) while no hooks could
    reach inside it, and eager while they could (a probe's capture, a gate intervention, a global
    module hook).

    The compiler traces hooks in once and does not notice hooks added or removed later
    (``torch._dynamo.config.skip_nnmodule_hook_guards``), so the compiled graph is only ever
    traced and run with none inside; hooks on ``module`` itself run eagerly around either path.
    A module the compiler cannot take runs eager from then on, with a warning: a trace or kernel
    build that fails (the backward pass is built with the forward, so its failures land here
    too), or more than :data:`RECOMPILE_LIMIT` graphs for one forward function (every robustse
    architecture shares one). An error the module itself raises is raised as it is (e.g. a
    ``.view`` that channels_last strides refuse, which :func:`in_default_layout_if_needed`
    handles). Models of one architecture share the compiled graphs (the warm-up is paid once per
    architecture, input shape and grad mode in a process), and the compiler's on-disk cache
    shortens the next process's warm-up. The same function up to float rounding.

    Returns:
        A shallow copy of ``module`` (the same submodules, parameters and hooks).
    """
    fast = _compiled_call(torch.compile(module.forward))
    eager = module.forward
    refused: list[bool] = []  # the compiler could not take the module: eager from then on

    def forward(*args: Any, **kwargs: Any) -> Any:
        if refused or _global_hooks() or any(has_hooks(m) for m in module.modules() if m is not module):
            return eager(*args, **kwargs)
        try:
            return fast(*args, **kwargs)
        except Exception as exc:
            if not _compiler_error(exc):
                raise
            out = eager(*args, **kwargs)  # raises what the module itself raises, if it does
            refused.append(True)
            warnings.warn(f"torch.compile could not take {type(module).__name__}; it runs eager ({_first_line(exc)})",
                          stacklevel=2)  # fmt: skip
            return out

    new = copy.copy(module)  # shares the hook dicts: hooks on the module itself fire around forward
    new.forward = forward
    return new


RECOMPILE_LIMIT = 64  # graphs per forward function: architectures x shapes x grad modes x layouts


def _compiled_call(fast: Callable[..., Any]) -> Callable[..., Any]:
    """``fast`` called with the backward pass built at the first forward (so a failure to build
    it is raised there) and with a recompile limit that fails loudly instead of quietly running
    eager."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    def call(*args: Any, **kwargs: Any) -> Any:
        limit = max(RECOMPILE_LIMIT, dynamo_config.recompile_limit)
        with (
            dynamo_config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True),
            functorch_config.patch(force_non_lazy_backward_lowering=True),
        ):
            return fast(*args, **kwargs)

    return call


def _global_hooks() -> bool:
    """Whether module hooks registered for every module exist (``register_module_forward_hook``)."""
    m = _module
    hooks = (m._global_forward_hooks, m._global_forward_pre_hooks, m._global_backward_hooks,
             m._global_backward_pre_hooks)  # fmt: skip
    return any(hooks)


def _compiler_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the compiler's (torch._dynamo is only imported once something compiled)."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    return isinstance(exc, (TorchDynamoException, FailOnRecompileLimitHit))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Models whose own code needs activations in the default layout (a .view() after a convolution):
# their eval copy keeps that layout once a channels_last pass failed.
_DEFAULT_LAYOUT: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def in_default_layout_if_needed(model: nn.Module, run: Callable[[], Any]) -> Any:
    """``run()``; if the model's code refused the channels_last copy's strides (``.view`` after
    a convolution), remember the model and run again (its :func:`copy_for` now keeps the layout)."""
    try:
        return run()
    except RuntimeError as exc:
        if "view size is not compatible" not in str(exc) or model in _DEFAULT_LAYOUT:
            raise
        _DEFAULT_LAYOUT.add(model)
        return run()


def _copy(module: nn.Module, layout: bool) -> nn.Module:
    """The copy of one module: folded, affine, re-laid out, or itself if nothing below it changes."""
    if _foldable_bn(module):
        return EvalAffine(module).eval()  # type: ignore[arg-type]
    # a fold changes what the conv outputs: only where nothing but the next child reads it
    plain = isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
    children = _fold_pairs(module._modules) if plain else dict(module._modules)
    children = {k: (None if c is None else _copy(c, layout)) for k, c in children.items()}
    params = _laid_out(module._parameters, layout, parameters=True)
    buffers = _laid_out(module._buffers, layout, parameters=False)
    if all(children[k] is module._modules[k] for k in children) and params is None and buffers is None:
        return module
    new = copy.copy(module)  # shares the hook dicts: hooks registered on the model fire here too
    new._modules = children
    new._parameters = module._parameters if params is None else params
    new._buffers = module._buffers if buffers is None else buffers
    return new


def _fold_pairs(children: dict[str, nn.Module | None]) -> dict[str, nn.Module | None]:
    """A Sequential's children with each unhooked (Conv2d, BatchNorm2d) pair folded into one conv."""
    names, out = list(children), dict(children)
    for a, b in zip(names, names[1:], strict=False):
        conv, bn = out[a], out[b]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and _foldable_pair(conv, bn):
            out[a], out[b] = fuse_conv_bn_eval(conv, bn), nn.Identity().eval()
    return out


def _foldable_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    """A plain unhooked eval-mode Conv2d followed by a foldable BatchNorm2d of its width."""
    return (
        type(conv) is nn.Conv2d
        and not has_hooks(conv)
        and not conv.training
        and isinstance(bn, nn.BatchNorm2d)
        and _foldable_bn(bn)
        and bn.num_features == conv.out_channels
    )


def _foldable_bn(m: nn.Module) -> bool:
    """An eval-mode batch norm on running statistics, with the standard forward and no hooks."""
    return (
        isinstance(m, _BatchNorm)
        and type(m).forward is _BatchNorm.forward
        and not m.training
        and m.running_mean is not None
        and m.running_var is not None
        and not has_hooks(m)
    )


def _laid_out(tensors: Mapping[str, torch.Tensor | None], layout: bool, *, parameters: bool) -> dict | None:
    """``tensors`` with the 4-d ones in channels_last layout (same values), or None if none moves."""
    if not layout or not any(t is not None and t.dim() == 4 for t in tensors.values()):
        return None
    out: dict[str, torch.Tensor | None] = {}
    for k, t in tensors.items():
        if t is not None and t.dim() == 4:
            t = t.detach().to(memory_format=torch.channels_last)  # restrides ambiguous shapes too
            t = nn.Parameter(t, requires_grad=False) if parameters else t
        out[k] = t
    return out


def has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` itself carries forward or backward hooks (of any kind)."""
    return any(getattr(m, name, None) for name in _HOOKS)


def _layout_free(m: nn.Module) -> bool:
    """No hooks on ``m`` but those marked :func:`any_layout`."""
    return all(getattr(h, _ANY_LAYOUT, False) for name in _HOOKS for h in (getattr(m, name, None) or {}).values())


def _opaque(model: nn.Module) -> bool:
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel, torch.jit.ScriptModule)
    return any(isinstance(m, wrappers) or hasattr(m, "_orig_mod") for m in model.modules())
