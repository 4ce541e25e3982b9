"""What each registered attack is for, readable without importing torch (statistics, checks, report).

An attack's *role* decides where its cells count:

* ``attack``: an attack on the label; counts toward robust accuracy (the per-example worst case).
* ``control``: a perturbation that is measured but is not an attack (the random-noise control at
  the same norm and eps).
* ``probe``: an attack on something other than the label (the gate attack, which moves the SE gates
  as far as it can); runs on SE models only and never counts toward robust accuracy.

The attack registry (:mod:`robustse.attacks`) takes each entry's role from here, so the role is a
field of the registry entry and every reader asks :func:`attack_role` instead of comparing names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

Role = Literal["attack", "control", "probe"]
TORCHATTACKS_PREFIX = "torchattacks:"

# Registered attack names and their roles; torchattacks attacks (``torchattacks:<Name>``) are attacks.
ROLES: dict[str, Role] = {"fgsm": "attack", "pgd": "attack", "noise": "control", "gate": "probe"}


def attack_role(name: str) -> Role:
    """The role of the attack stored under ``name`` (a registry name or ``torchattacks:<Name>``)."""
    if name.startswith(TORCHATTACKS_PREFIX):
        return "attack"
    return ROLES.get(name, "attack")


def is_attack(name: str) -> bool:
    """Whether cells of ``name`` count toward robust accuracy."""
    return attack_role(name) == "attack"


def names_with_role(names: Iterable[str], role: Role) -> list[str]:
    """The names among ``names`` (order kept, duplicates dropped) whose attack has ``role``."""
    return [n for n in dict.fromkeys(names) if attack_role(n) == role]


def roles_of(names: Iterable[str]) -> dict[str, Role]:
    """``{name: role}`` for the distinct ``names``: map a table's attack column through it
    (``df.attack.map(roles_of(df.attack.unique()))``) to look each name up once, not per row."""
    return {n: attack_role(n) for n in dict.fromkeys(names)}
