"""Compiled attack passes in a sweep (``[sweep] compile``, ``robustse sweep --compile``): when they run.

``on`` gives each model's eval-mode copy (:mod:`robustse.models.eval_copy`) a forward run through
``torch.compile`` (:func:`robustse.models.eval_copy.with_compiled_forward`) for the attacks'
forward and backward passes; passes with hooks inside the model (the probes' captures, the gate
interventions) run eager, and predictions run through the sweep's evaluator as before. Results
equal eager ones up to float rounding.

``auto`` compiles where it was measured to pay (README "Performance": compiled attack passes;
``benchmarks/compile_speed.py``, whose ``attack`` rows time the eval-mode copy eager and
compiled). On a 2-core CPU the ResNet-20 family (``resnet20``, ``se_resnet20``,
``static_resnet20``) ran PGD-10 1.12-1.19× as fast compiled; a whole ``robustse sweep`` of
``se_resnet20`` (1,000 images, probes off, 240 planned passes) took 80.6 s eager, 168.7 s
compiled with an empty compiler cache and 74.8 s with a filled one. The first compilation costs
about 90 s and a planned pass saves 24-57 ms (the sweep's own saving with a filled cache, and
``compile_speed.py``'s per-pass saving), so the break-even with an empty cache lies at
1,600-3,700 planned passes: the family compiles once a model's planned passes reach
:data:`AUTO_MIN_PASSES` (the whole 10,000-image test set with the default ladders plans 2,400
per model and stays eager). The ``small_cnn`` family ran 0.42× (plain and static) and 1.11×
(SE), and a whole sweep of a trained ``se_small_cnn`` took 18-20 s eager and 25-28 s compiled
even with a filled cache, so it stays eager, as do unmeasured architectures and CUDA (``make
gpu-check`` measures it). The environment variable ``ROBUSTSE_COMPILE`` replaces ``auto``
(:mod:`robustse.core.compiling`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from robustse.core.compiling import has_cxx_compiler, require_compiler, resolved_setting
from robustse.models.registry import list_models, model_info

AUTO_DEVICES: frozenset[str] = frozenset()  # device types where every architecture compiles under auto
AUTO_CPU_FAMILIES: frozenset[str] = frozenset({"resnet20"})  # measured faster compiled on a CPU
AUTO_MIN_PASSES = 3_000  # planned passes per model: past the break-even with an empty compiler cache


def compiles_attacks(setting: str, device: torch.device, *, arch: object = None, passes: int = 0) -> bool:
    """Whether a sweep on ``device`` runs a model's attack passes compiled under ``setting``.

    Args:
        setting: ``auto``, ``on`` or ``off`` (``auto`` as
            :func:`robustse.core.compiling.resolved_setting` resolves it).
        device: where the sweep runs.
        arch: the model's architecture (its family decides ``auto``; None or a foreign one: eager).
        passes: the model's planned gradient passes (:func:`planned_passes`).

    Raises:
        SpecError: a setting other than auto, on, off.
        DeviceError: ``on`` on a CPU without a C++ compiler.
    """
    chosen = resolved_setting(setting)
    if chosen == "on":
        require_compiler(device, has_cxx_compiler())
    if chosen != "auto":
        return chosen == "on"
    if device.type in AUTO_DEVICES:
        return device.type != "cpu" or has_cxx_compiler()
    long_enough = passes >= AUTO_MIN_PASSES
    return device.type == "cpu" and _family(arch) in AUTO_CPU_FAMILIES and long_enough and has_cxx_compiler()


def _family(arch: object) -> str | None:
    """A registered architecture's family; None for anything else (timm:..., torchvision:..., None)."""
    return model_info(arch).family if isinstance(arch, str) and arch in list_models() else None


def planned_passes(ladders: Iterable[tuple[object, int]], batches: int) -> int:
    """Gradient passes a model's ladders plan, at most: per (attack, rungs to run), steps ×
    restarts per rung and batch (an attack without ``steps`` counts one; the eps = 0 rung and
    the noise control count too, so this is an upper bound, the unit of :data:`AUTO_MIN_PASSES`)."""
    per_batch = sum(int(getattr(a, "steps", 1)) * int(getattr(a, "restarts", 1)) * rungs for a, rungs in ladders)
    return per_batch * batches
