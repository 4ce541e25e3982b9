"""Compiled attack passes in a sweep (``[sweep] compile``, ``robustse sweep --compile``): when they run.

``on`` gives each model's eval-mode copy (:mod:`robustse.models.eval_copy`) a forward run through
``torch.compile`` (:func:`robustse.models.eval_copy.with_compiled_forward`) for the attacks'
forward and backward passes; passes with hooks inside the model (the probes' captures, the gate
interventions) run eager, and predictions run through the sweep's evaluator as before. Results
equal eager ones up to float rounding.

``auto`` compiles on the device types listed in :data:`AUTO_DEVICES`, where compiled attack
passes were measured faster than eager ones (README "Performance": compiled attack passes;
``benchmarks/compile_speed.py``, whose ``attack`` rows time the eval-mode copy eager and
compiled). None so far: on a 2-core CPU a PGD-10 call ran 0.42× as fast compiled as eager for
``small_cnn`` and ``static_small_cnn`` and 1.11× for ``se_small_cnn``, and a whole ``robustse
sweep`` of a trained ``se_small_cnn`` (1,000 images, probes off) took 18-20 s eager, 77 s
compiled with an empty compiler cache and 25-28 s with a filled one. CUDA has not been measured
(``make gpu-check`` does). The environment variable ``ROBUSTSE_COMPILE`` replaces ``auto``
(:mod:`robustse.core.compiling`).
"""

from __future__ import annotations

import torch

from robustse.core.compiling import has_cxx_compiler, require_compiler, resolved_setting

AUTO_DEVICES: frozenset[str] = frozenset()  # device types where compiled attack passes measured faster


def compiles_attacks(setting: str, device: torch.device) -> bool:
    """Whether a sweep on ``device`` runs its attack passes compiled under ``setting``.

    Args:
        setting: ``auto``, ``on`` or ``off`` (``auto`` as
            :func:`robustse.core.compiling.resolved_setting` resolves it).
        device: where the sweep runs.

    Raises:
        SpecError: a setting other than auto, on, off.
        DeviceError: ``on`` on a CPU without a C++ compiler.
    """
    chosen = resolved_setting(setting)
    if chosen == "on":
        require_compiler(device, has_cxx_compiler())
    if chosen == "auto":
        return device.type in AUTO_DEVICES and (device.type != "cpu" or has_cxx_compiler())
    return chosen == "on"
