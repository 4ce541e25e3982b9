"""Compiled training steps (``torch.compile``, inductor): when they run, and the switch.

``[train] compile`` (``robustse train --compile``) is ``auto``, ``on`` or ``off``. ``auto``
compiles where it was measured to pay (``benchmarks/compile_speed.py``): on a CPU with a C++
compiler, for a model with gates (SE twins and static controls, whose small gate layers the
compiler fuses into the surrounding kernels), trained in one process, in float32, without
adversarial training, for at least ``AUTO_MIN_STEPS`` SGD steps. Measured on a 2-core CPU
(``small_cnn`` calibration 3,463 img/s): a compiled ``se_small_cnn`` step is 1.24× faster
(``static_small_cnn`` 1.22×, plain ``small_cnn`` 1.11×), but the first compilation in a
process with an empty compiler cache took about 53 s (the last, smaller batch of an epoch
compiles a second graph), and about 4 s with the cache filled; a second model of the same
architecture in the same process reused the compiled graph (0.1 s). One epoch of Fashion-MNIST (469
steps) therefore ran no faster compiled even with the cache filled; the break-even with an empty
cache is about 5,500 steps. Plain models, CUDA (not measured yet), torchrun, mixed precision,
adversarial training and short runs stay eager under ``auto``; ``on`` compiles them anyway.

Those figures compare layouts as they were before channels_last training: against eager
training in channels_last layout (the CPU's default, ``[train] channels_last = auto``), a
compiled step gained little or lost (``compile_speed.py --channels-last``, calibration about
4,300 img/s): ``small_cnn`` 0.73×, ``se_small_cnn`` 1.03×, ``static_small_cnn`` 0.92×,
``resnet20`` 0.97×, ``se_resnet20`` 1.04×, ``static_resnet20`` 1.07×, after 33-44 s warm-ups for
the ResNets. So ``auto`` compiles only training in the default layout (``channels_last = off``).

The environment variable ``ROBUSTSE_COMPILE`` (:mod:`robustse.core.compiling`) replaces ``auto``,
e.g. to switch compilation off for a whole test session. A compiled step computes the same
function as the eager one up to float rounding (the two losses and gradients agree to ~1e-6), so
a checkpoint's fingerprint does not depend on the setting; runs differ in the last bits, as on
another device.
"""

from __future__ import annotations

import torch
from torch import nn

from robustse.core.compiling import (
    COMPILE_CHOICES,
    COMPILE_ENV,
    CompileSetting,
    has_cxx_compiler,
    require_compiler,
    resolved_setting,
)
from robustse.models.registry import model_info

__all__ = ["COMPILE_CHOICES", "COMPILE_ENV", "CompileSetting", "compiled", "compiles_training", "has_cxx_compiler",
           "resolved_setting"]  # fmt: skip

AUTO_MIN_STEPS = 5_000  # about the measured break-even with an empty compiler cache


def compiles_training(setting: str, arch: str, device: torch.device, *, steps: int, single_process: bool,
                      plain_float: bool, channels_last: bool = False) -> bool:  # fmt: skip
    """Whether training steps of ``arch`` on ``device`` run compiled under ``setting``.

    Args:
        setting: ``auto``, ``on`` or ``off`` (``auto`` as :func:`resolved_setting` resolves it).
        arch: the architecture (its kind decides ``auto``).
        device: where it trains.
        steps: the SGD steps of the whole run.
        single_process: not under torchrun.
        plain_float: float32 training without adversarial examples.
        channels_last: training in channels_last layout (where compiling measured no gain).

    Raises:
        DeviceError: ``on`` on a CPU without a C++ compiler.
    """
    chosen = resolved_setting(setting)
    if chosen == "off":
        return False
    if chosen == "on":
        require_compiler(device, has_cxx_compiler())
        return True
    gated = model_info(arch).kind != "plain"
    long_enough = steps >= AUTO_MIN_STEPS
    plain_run = single_process and plain_float and not channels_last
    return device.type == "cpu" and gated and long_enough and plain_run and has_cxx_compiler()


def compiled(net: nn.Module) -> nn.Module:
    """``net`` compiled for training steps: shapes become dynamic after the first change (the
    last, smaller batch of an epoch), so each architecture compiles at most twice per process,
    and the compiler's on-disk cache shortens the next process's warm-up."""
    return torch.compile(net)  # type: ignore[return-value]
