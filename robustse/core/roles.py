"""What each attack is for, readable without importing torch (statistics, checks, report).

An attack's *role* decides where its cells count:

* ``attack``: an attack on the label; counts toward robust accuracy (the per-example worst case).
* ``control``: a perturbation that is measured but is not an attack (the random-noise control at
  the same norm and eps).
* ``probe``: an attack on something other than the label (the gate attack, which moves the SE gates
  as far as it can); runs on SE models only and never counts toward robust accuracy.

The role is given once, where the attack is registered (``@register_attack(name, role=...)`` in
:mod:`robustse.attacks`), which declares it here. A sweep records the roles of its attacks in its
results store, and a report reads them back (:func:`recorded_roles`), so ``robustse report`` knows a
plugin's role without importing the plugin, or torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal, cast

Role = Literal["attack", "control", "probe"]
ROLE_NAMES: tuple[Role, ...] = ("attack", "control", "probe")
TORCHATTACKS_PREFIX = "torchattacks:"

# Stores written before sweeps recorded their attacks' roles hold only the built-in attacks; these
# are their roles, used only for names that neither the store nor this process's registry knows
# (a test checks they agree with the registry).
UNRECORDED_ROLES: dict[str, Role] = {"fgsm": "attack", "pgd": "attack", "noise": "control", "gate": "probe"}

_declared: dict[str, Role] = {}  # by register_attack, in this process
_recorded: list[Mapping[str, Role]] = []  # by the store being reported on (innermost last)


def check_role(role: object, name: str = "") -> Role:
    """``role`` if it is one of :data:`ROLE_NAMES`, else ValueError naming the valid ones."""
    if role not in ROLE_NAMES:
        where = f" of attack {name!r}" if name else ""
        raise ValueError(f"role{where} must be one of {', '.join(ROLE_NAMES)} (got {role!r})")
    return cast(Role, role)


def declare_role(name: str, role: Role) -> None:
    """Record the role of a registered attack (called by ``register_attack``)."""
    _declared[name] = check_role(role, name)


def forget_role(name: str) -> None:
    """Drop a declared role (an attack taken out of the registry again)."""
    _declared.pop(name, None)


def declared_roles() -> dict[str, Role]:
    """``{name: role}`` of every attack registered in this process."""
    return dict(_declared)


@contextlib.contextmanager
def recorded_roles(roles: Mapping[str, str]) -> Iterator[None]:
    """Read ``roles`` (a results store's record) first, inside the block: a report on a store goes
    by the roles its sweep ran with. Unknown role values are ignored."""
    _recorded.append({n: cast(Role, r) for n, r in roles.items() if r in ROLE_NAMES})
    try:
        yield
    finally:
        _recorded.pop()


def attack_role(name: str) -> Role:
    """The role of the attack stored under ``name`` (a registry name or ``torchattacks:<Name>``):
    the store's record, else this process's registry, else ``attack``."""
    for table in reversed(_recorded):
        if name in table:
            return table[name]
    if name in _declared:
        return _declared[name]
    if name.startswith(TORCHATTACKS_PREFIX):
        return "attack"
    return UNRECORDED_ROLES.get(name, "attack")


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
