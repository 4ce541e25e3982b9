"""Stage 1 of the report: what a run directory holds (the results store, ``models.csv``,
``manifest.json``, ``spec.toml``), read once into a :class:`RunData`, and the ``[report]`` options."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustse.analysis import inference as I
from robustse.core.errors import ModelError, StoreError
from robustse.core.roles import names_with_role, recorded_roles
from robustse.core.store import ResultsStore
from robustse.core.types import PathLike, split_intervention

MODEL_COLUMNS = ["label", "family", "se", "arm", "seed", "kind"]


@dataclass(frozen=True)
class ReportOptions:
    """The ``[report]`` options of a run (bootstrap replicates, alpha, gallery eps, resampling seed,
    primary endpoint, equivalence margins)."""

    n_boot: int
    alpha: float
    gallery_eps: float | None
    seed: int
    primary: str = I.PRIMARY
    margins: dict[str, float] = field(default_factory=dict)


@dataclass
class RunData:
    """Stage 1 (:func:`load_run`): what the run directory holds, read once."""

    run: Path
    models: pd.DataFrame
    examples: pd.DataFrame
    site_examples: pd.DataFrame
    sites: pd.DataFrame
    excitations: pd.DataFrame
    gallery: pd.DataFrame
    checks: pd.DataFrame
    cells: pd.DataFrame
    classes: list[str]
    dataset: str
    manifest: dict[str, Any]
    spec: str | None
    roles: dict[str, str] = field(default_factory=dict)  # {attack: role} as the sweeps recorded them
    out: Path | None = None  # where the report is written (default: the run directory)

    @property
    def target(self) -> Path:
        """The directory the report files go to."""
        return self.out if self.out is not None else self.run


# --------------------------------------------------------------------------- options


def _report_config(run_dir: Path) -> ReportOptions:
    """The ``[report]`` options of the run's spec (defaults when there is none)."""
    from robustse.core.config import ReportConfig, load_spec

    defaults = ReportConfig()
    spec = run_dir / "spec.toml"
    if spec.exists():
        with contextlib.suppress(Exception):  # a spec from another version still leaves a reportable store
            defaults = load_spec(spec).report
    d = defaults
    return ReportOptions(d.bootstrap, d.alpha, d.gallery_eps, d.seed, d.primary, dict(d.margins))


def resolve_options(
    run: Path, n_boot: int | None, alpha: float | None, gallery_eps: float | None, seed: int | None
) -> ReportOptions:
    """The caller's options, the spec's where the caller gave none."""
    cfg = _report_config(run)
    return ReportOptions(
        n_boot=n_boot or cfg.n_boot,
        alpha=alpha or cfg.alpha,
        gallery_eps=cfg.gallery_eps if gallery_eps is None else gallery_eps,
        seed=cfg.seed if seed is None else seed,
        primary=cfg.primary,
        margins=cfg.margins,
    )


# --------------------------------------------------------------------------- stage 1: load


def load_run(run_dir: PathLike) -> RunData:
    """Read everything the report needs from a run directory.

    Raises:
        StoreError: no (or an unreadable, or an empty) ``results.db``; or robust-accuracy attacks
            of more than one norm (the worst case and the comparisons take one norm at a time).
    """
    run = Path(run_dir)
    db = run / "results.db"
    if not db.exists() and not db.is_symlink():
        raise StoreError(f"{run}: no results.db here (run `robustse experiment` or `robustse sweep` first)")
    with ResultsStore(db, read_only=True) as store:
        data = _read_store(run, db, store)
    with recorded_roles(data.roles):
        _require_one_norm(run, data.examples)
    return data


def _read_store(run: Path, db: Path, store: ResultsStore) -> RunData:
    models = _models_table(run, store)
    examples = store.examples()
    if examples.empty:
        raise StoreError(f"{db}: no finished cells to report on")
    return RunData(
        run=run, models=models, examples=examples, site_examples=store.probe_table("site_examples"),
        sites=store.probe_table("sites"), excitations=store.probe_table("excitations"),
        gallery=store.probe_table("gallery"), checks=store.checks(), cells=store.cells(),
        classes=json.loads(store.get_meta("classes") or "[]"), dataset=store.get_meta("dataset") or "?",
        manifest=_read_json(run / "manifest.json"), spec=_read_text(run / "spec.toml"), roles=store.roles(),
    )  # fmt: skip


def _require_one_norm(run: Path, examples: pd.DataFrame) -> None:
    """Refuse robust-accuracy attacks of several norms: one message naming each attack's norms."""
    attacks = examples[examples.attack.isin(names_with_role(examples.attack, "attack"))]
    if attacks.norm.nunique() <= 1:
        return
    norms = attacks.groupby("attack", sort=False).norm.unique()
    mixed = ", ".join(f"{attack}: {'/'.join(sorted(n))}" for attack, n in norms.items())
    raise StoreError(f"{run}: this run mixes norms ({mixed}); the report compares one norm at a time")


def _models_table(run_dir: Path, store: ResultsStore) -> pd.DataFrame:
    """label, family, se, arm, seed of every model in the store (``models.csv`` if the run has one).

    Gate interventions (``<label>@held_gates``...) are not models of their own here: they are
    compared with the model they intervene on.
    """
    stored = store.models()
    stored = stored[[split_intervention(m)[1] is None for m in stored.model]]
    path = run_dir / "models.csv"
    if path.exists():
        try:
            table = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StoreError(
                f"{path}: unreadable ({reason}); restore it, or delete it to rebuild the model table from the store"
            ) from None
        if set(MODEL_COLUMNS[:-1]) <= set(table.columns):
            table["se"] = table.se.astype(str).str.lower().isin(["true", "1"])
            if "kind" not in table:  # written before the static control existed
                table["kind"] = np.where(table.se, "se", "plain")
            return table[table.label.isin(stored.model)].reset_index(drop=True)
    gated = _gated_models(store)
    table = pd.DataFrame([_model_row(r, gated) for _, r in stored.iterrows()], columns=MODEL_COLUMNS)
    _refuse_shared_seeds(table)
    return table


def _refuse_shared_seeds(table: pd.DataFrame) -> None:
    """Two models of one family and kind with the same seed cannot both be paired: say how to
    tell them apart instead of pairing one at random.

    Raises:
        StoreError: naming both models.
    """
    dupes = table[table.duplicated(["arm", "family", "kind", "seed"], keep=False)]
    if dupes.empty:
        return
    first = dupes.iloc[0]
    same = dupes[(dupes.family == first.family) & (dupes.kind == first.kind) & (dupes.seed == first.seed)]
    names = " and ".join(same.label.head(2))
    raise StoreError(
        f"{names} are both seed {first.seed} of {first.kind} {first.family}: end each weight file's name with "
        "_s<seed> (e.g. se_w_s1.pth), or list the models in models.csv (docs/tutorial.md: the pairing rule)"
    )


def _gated_models(store: ResultsStore) -> set[str]:
    """Models whose probes recorded channel gates."""
    sites = store.probe_table("sites")
    return set(sites[sites.kind == "gate"].model)


def _model_row(r: Any, gated: set[str]) -> dict[str, Any]:
    """A ``models.csv`` row for a stored model, from its architecture's registry entry; an
    external model (``timm:``/``torchvision:``) is SE when its gates were recorded, and twins
    with the external model whose name differs only by an ``se``/``legacy_se`` prefix
    (``timm:seresnet50`` and ``timm:resnet50``: family ``resnet50``).

    The seed (the pairing rule): the ``_s<N>`` ending of the model's label (a robustse checkpoint
    ``se_small_cnn_s3``, or foreign weights ``se_resnet20=w_s3.pth``), else 0, so one SE model and
    its plain twin pair whatever order they are given in."""
    from robustse.models import model_info

    arch = r["arch"] if isinstance(r["arch"], str) else None
    try:
        info = model_info(arch) if arch else None
    except ModelError:  # foreign architecture names (torchvision:...) are not in the registry
        info = None
    m = re.search(r"_s(\d+)$", r["model"])
    if info is None and arch and ":" in arch:
        se = r["model"] in gated
        return {"label": r["model"], "family": external_family(arch), "se": se, "arm": "main",
                "seed": int(m.group(1)) if m else 0, "kind": "se" if se else "plain"}  # fmt: skip
    return {
        "label": r["model"],
        "family": info.family if info else (arch or r["model"]),
        "se": bool(info.has_se) if info else False,
        "arm": "main",
        "seed": int(m.group(1)) if m else 0,
        "kind": info.kind if info else "plain",
    }


def external_family(arch: str) -> str:
    """``timm:legacy_seresnet50`` → ``resnet50``: the name without its source and SE prefix."""
    name = arch.split(":", 1)[1]
    return re.sub(r"^(legacy_)?se(?=res)", "", name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None
