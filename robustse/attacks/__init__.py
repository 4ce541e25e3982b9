"""Attacks: the contract every attack keeps (:mod:`~robustse.attacks.base`), the norm hooks
(:mod:`~robustse.attacks.norms`), one module per family (:mod:`~robustse.attacks.gradient`: PGD and
FGSM; :mod:`~robustse.attacks.noise`; :mod:`~robustse.attacks.gate`; :mod:`~robustse.attacks.adapter`
for torchattacks), the registry with its plugin loading (:mod:`~robustse.attacks.registry`), and the
prediction passes of a sweep (:mod:`~robustse.attacks.evaluator`).

May import :mod:`robustse.probes` (the gate attack records gates), :mod:`robustse.models`,
:mod:`robustse.data` and :mod:`robustse.core`. Importing this package registers the built-in
attacks.
"""

from robustse.attacks.base import Attack, AttackResult, Rungs
from robustse.attacks.checks import check_epsilons
from robustse.attacks.registry import (
    AttackInfo,
    attack_info,
    create_attack,
    list_attacks,
    load_plugin,
    register_attack,
    unregister_attack,
)

# the built-in families register themselves on import
from robustse.attacks import gate, gradient, noise  # noqa: E402,F401  isort: skip

__all__ = [
    "Attack", "AttackInfo", "AttackResult", "Rungs", "attack_info", "check_epsilons", "create_attack",
    "list_attacks", "load_plugin", "register_attack", "unregister_attack",
]  # fmt: skip
