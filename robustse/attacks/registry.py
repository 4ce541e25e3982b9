"""The attack registry: ``@register_attack(name, role=...)`` puts an :class:`~robustse.attacks.base.Attack`
subclass behind a name, :func:`create_attack` builds one, :func:`list_attacks` lists them.

Attacks from outside the package come in two ways (README "Adding an attack"): a module named with
``robustse --plugin MODULE_OR_FILE`` (:func:`load_plugin`), or an installed package that declares an
entry point in the group ``robustse.attacks`` (loaded the first time the registry is read).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from robustse.core.errors import AttackError
from robustse.core.registry import Registry
from robustse.core.roles import TORCHATTACKS_PREFIX, Role, attack_role, check_role, declare_role, forget_role

if TYPE_CHECKING:
    from robustse.attacks.base import Attack

ENTRY_POINT_GROUP = "robustse.attacks"
A = TypeVar("A", bound="type[Attack]")


@dataclass(frozen=True)
class AttackInfo:
    """A registered attack class and a line about it."""

    name: str
    cls: type[Attack]
    description: str

    @property
    def role(self) -> Role:
        """What the attack is for (:mod:`robustse.core.roles`): attack, control or probe."""
        return attack_role(self.name)

    def options(self) -> dict[str, Any]:
        """Keyword options with defaults (``robustse attacks`` lists them)."""
        return {
            f.name: f.default for f in dataclasses.fields(self.cls) if f.init and f.name not in ("max_batch", "options")
        }


_REGISTRY: Registry[AttackInfo] = Registry("attack", AttackError, hint=f"or {TORCHATTACKS_PREFIX}<Name>")
_entry_points_loaded = False


def register_attack(name: str, *, role: Role = "attack", description: str = "") -> Callable[[A], A]:
    """Class decorator: make an :class:`~robustse.attacks.base.Attack` subclass (a dataclass) the
    attack called ``name`` (``create_attack(name)``, ``robustse sweep --attack name``).

    Args:
        name: the registry name, also stored with every result; lower case, no ``:``.
        role: ``attack`` (counts toward robust accuracy), ``control`` (measured, not an attack) or
            ``probe`` (attacks something other than the label; never counts).
        description: one line for ``robustse attacks`` (default: the docstring's first line).

    Raises:
        ValueError: a name already taken, a bad name or role, or a class that is not an Attack.

    Example:
        >>> @register_attack("my_pgd", role="attack")  # doctest: +SKIP
        ... @dataclass
        ... class MyPGD(Attack): ...
    """
    check_role(role, name)
    if not isinstance(name, str) or not name or ":" in name or name != name.strip() or name != name.lower():
        raise ValueError(f"an attack name must be a non-empty lower-case string without ':' (got {name!r})")

    def add(cls: A) -> A:
        from robustse.attacks.base import Attack

        if not (isinstance(cls, type) and issubclass(cls, Attack)):
            raise ValueError(f"register_attack({name!r}) decorates an Attack subclass, not {cls!r}")
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"register_attack({name!r}): decorate a @dataclass (its fields are the options)")
        if getattr(cls, "_registered", None) is cls:
            taken = cls.attack_name
            raise ValueError(f"{cls.__name__} is already registered as {taken!r}; subclass it for a second name")
        line = description or (cls.__doc__ or name).strip().splitlines()[0]
        _REGISTRY.add(name, AttackInfo(name, cls, line))
        cls.attack_name, cls._registered = name, cls
        declare_role(name, role)
        return cls

    return add


def unregister_attack(name: str) -> None:
    """Take ``name`` out of the registry (tests; a plugin reloaded in a notebook); its class may be
    registered again."""
    try:
        info = _REGISTRY.get(name)
    except AttackError:
        return
    info.cls._registered = None
    _REGISTRY.remove(name)
    forget_role(name)


def list_attacks(pattern: str = "*") -> list[str]:
    """Registered attack names, plugins included (torchattacks attacks are reached as
    ``torchattacks:<Name>``)."""
    load_entry_points()
    return _REGISTRY.names(pattern)


def attack_info(name: str) -> AttackInfo:
    """Registry entry of ``name`` (AttackError listing the valid names if unknown)."""
    load_entry_points()
    return _REGISTRY.get(name)


def create_attack(name: str, **kwargs: Any) -> Attack:
    """Build an attack by name.

    Args:
        name: a registered name (``fgsm``, ``pgd``, ``noise``, ``gate``, a plugin's) or
            ``torchattacks:<Name>``.
        **kwargs: options (``norm``, ``steps``, ``rel_stepsize``, ``random_start``, ``restarts``,
            ``seed``...); for torchattacks, that attack's own keyword arguments.

    Raises:
        AttackError: unknown attack, norm or option, or an out-of-range option.

    Example:
        >>> atk = create_attack("pgd", norm="linf", steps=10)
    """
    if not isinstance(name, str):
        raise AttackError(f"an attack is named by a string (got {name!r})")
    if name.startswith(TORCHATTACKS_PREFIX):
        from robustse.attacks.adapter import TorchattacksAttack

        attack = name.split(":", 1)[1]
        common = {k: kwargs.pop(k) for k in ("norm", "seed", "only_eps", "exact") if k in kwargs}
        # torchattacks names its L2 attacks *L2 (PGDL2, FGSM has no L2 twin): the budget's norm;
        # attacks with a norm option of their own (APGD, Square, AutoAttack) get it from here
        common.setdefault("norm", "l2" if attack.upper().endswith("L2") else "linf")
        return TorchattacksAttack(attack=attack, options=kwargs, **common)
    info = attack_info(name)
    valid = info.options()
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise AttackError(f"{name}: unknown option {unknown[0]!r} (valid: {', '.join(valid)})")
    try:
        return info.cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the option check above
        raise AttackError(f"{name}: {exc}") from None


# --------------------------------------------------------------------------- plugins


def load_plugin(target: str) -> ModuleType:
    """Import a module that registers attacks: a module name (looked up on ``sys.path`` and then
    in the current directory) or the path of a ``.py`` file.

    Raises:
        AttackError: the module is not found, or importing it fails (one line with the reason).
    """
    if not isinstance(target, str) or not target.strip():
        raise AttackError(f"--plugin takes a module name or a .py file (got {target!r})")
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            return _import_file(Path(target))
        return _import_module(target)
    except AttackError:
        raise
    except Exception as exc:  # the plugin's own code failed: say where, in one line
        raise AttackError(f"plugin {target!r} failed to import ({type(exc).__name__}: {exc})") from None


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name.split(".")[0] and exc.name != name:
            raise  # the plugin itself imports something missing: reported by load_plugin
    cwd = str(Path.cwd())
    if cwd in sys.path:
        raise AttackError(f"plugin module {name!r} not found (on sys.path or in {cwd})")
    sys.path.append(cwd)  # as `python -m` would find it; appended, so it never shadows a package
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name in (name, name.split(".")[0]):
            raise AttackError(f"plugin module {name!r} not found (on sys.path or in {cwd})") from None
        raise


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise AttackError(f"plugin file {str(path)!r} not found")
    name = f"robustse_plugin_{path.stem}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path.resolve()):
        return sys.modules[name]  # loaded already: registering twice would fail
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    if spec is None or spec.loader is None:
        raise AttackError(f"plugin file {str(path)!r} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_entry_points() -> None:
    """Import every installed plugin of the entry point group ``robustse.attacks`` (once).

    Raises:
        AttackError: an installed plugin fails to load (one line naming it: fix or uninstall it).
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:
            raise AttackError(
                f"attack plugin {ep.name!r} ({ep.value}) failed to load ({type(exc).__name__}: {exc}); "
                "fix or uninstall it"
            ) from None
    _entry_points_loaded = True
