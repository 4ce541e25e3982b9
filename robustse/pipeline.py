"""``experiment``: spec → trained (or loaded) twins over seeds and arms → sweep with probes →
statistics and the verdict → report, in one run directory.

Every stage is resumable: trained checkpoints are reused when their configuration matches, an
interrupted training run resumes from its last epoch, finished sweep cells are skipped, and the
report is regenerated from the store. ``manifest.json`` records versions, seeds, the git commit,
the device and the time of every phase.
"""

from __future__ import annotations

import csv
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._types import PathLike
from .checkpoint import library_versions, load_checkpoint
from .config import ArmConfig, ExperimentSpec, SweepConfig, load_spec
from .data import Dataset, load_dataset
from .distributed import SINGLE, Dist
from .errors import DataError, SpecError
from .models import model_info
from .stats import wilson_interval
from .sweep import SweepModel, SweepResult, build_attacks, run_sweep
from .train import SUBSET_SEED, load_splits, train_model


@dataclass
class ModelRow:
    """One model of an experiment (its sweep label is ``label``)."""

    label: str
    model: str
    family: str
    se: bool
    arm: str
    seed: int
    clean_accuracy: float
    ci_low: float
    ci_high: float
    eval_examples: int
    train_seconds: float
    checkpoint: str


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` produced."""

    spec: ExperimentSpec
    out_dir: Path
    rows: list[ModelRow] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    sweep: SweepResult | None = None
    report: Any = None  # robustse.report.ReportResult once the report is written


def twin_names(spec: ExperimentSpec) -> list[str]:
    """Every architecture the spec trains: each listed plain model followed by its SE twin."""
    names = []
    for plain in spec.models.twins:
        info = model_info(plain)
        if info.has_se:
            raise SpecError(
                f"models.twins lists {plain!r}: name the plain twin ({info.family!r}); its SE twin is added"
            )
        model_info(info.twin)  # the SE twin must exist
        names += [plain, info.twin]
    return names


@dataclass(frozen=True)
class PlannedModel:
    """A model the experiment trains: architecture, arm, seed and its checkpoint's label."""

    label: str
    arch: str
    arm: ArmConfig
    seed: int


def plan_models(spec: ExperimentSpec) -> list[PlannedModel]:
    """Every model the spec trains, seeds outermost; labels ``<arch>_s<seed>`` (one arm) or
    ``<arch>_<arm>_s<seed>``. SE-only arms (``plain = false``) train no plain twin."""
    names = twin_names(spec)
    many = len(spec.arms) > 1
    plan = []
    for seed in spec.seeds:
        for arm in spec.arms:
            for name in names:
                if not arm.plain and not model_info(name).has_se:
                    continue
                label = f"{name}_{arm.name}_s{seed}" if many else f"{name}_s{seed}"
                plan.append(PlannedModel(label, name, arm, seed))
    return plan


def prepare_out_dir(out_dir: Path) -> Path:
    """Create the run directory (refusing a path that is a file or cannot be written)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SpecError(f"output path {out_dir} exists and is not a directory")
    try:
        (out_dir / "models").mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SpecError(f"output directory {out_dir} is not writable ({exc.strerror or exc})") from None
    return out_dir


def run_experiment(
    spec: ExperimentSpec | PathLike,
    out_dir: PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    layout: Dist = SINGLE,
) -> ExperimentResult:
    """Run an experiment spec end to end into ``out_dir`` (default ``reports/<spec name>``).

    Args:
        spec: an :class:`ExperimentSpec` or the path of a TOML spec.
        out_dir: the run directory.
        device: where to train and evaluate.
        progress: show progress bars.
        log: receives progress lines.
        layout: under torchrun, training uses DDP and the sweep is sharded; rank 0 writes the
            files (the run directory must be shared by all ranks).

    Returns:
        :class:`ExperimentResult` with one row per trained model (ranks other than 0: no report).

    Example:
        >>> run_experiment("attacks/quick.toml")  # doctest: +SKIP
    """
    spec_text = None
    if not isinstance(spec, ExperimentSpec):
        spec_text = Path(spec).read_text(encoding="utf-8") if Path(spec).is_file() else None
        spec = load_spec(spec)
    out = Path(out_dir) if out_dir is not None else Path("reports") / spec.name
    if layout.is_main:
        prepare_out_dir(out)
        (out / "spec.toml").write_text(
            spec_text if spec_text is not None else dump_toml(asdict(spec)), encoding="utf-8"
        )
    layout.barrier()
    twin_names(spec)  # unknown or SE names fail before anything runs
    result = ExperimentResult(spec, out)

    t0 = time.perf_counter()
    splits = load_splits(spec.data)
    result.timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if spec.models.checkpoints:
        result.rows = _given_models(spec.models.checkpoints)
    else:
        for pm in plan_models(spec):
            info = model_info(pm.arch)
            trained = train_model(
                pm.arch,
                out=out / "models" / f"{pm.label}.safetensors",
                data=spec.data,
                train=spec.arm_train(pm.arm),
                seed=pm.seed,
                model_kwargs=spec.arm_se_options(pm.arm) if info.has_se else {},
                device=device,
                progress=progress,
                log=log,
                splits=splits,
                layout=layout,
            )
            result.rows.append(_model_row(pm.label, pm.arch, pm.arm.name, pm.seed, trained.meta, trained.checkpoint))
            if log and layout.is_main:
                r = result.rows[-1]
                log(f"{pm.label}: clean accuracy {r.clean_accuracy:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}]")
    result.timings["train"] = time.perf_counter() - t0

    if layout.is_main:
        _write_rows(out / "models.csv", result.rows)
    if spec.sweep is not None:
        t0 = time.perf_counter()
        attacks = build_attacks(spec.sweep.attacks, norm=spec.sweep.norm, seed=spec.sweep.seed)
        models = load_sweep_models([r.checkpoint for r in result.rows], device=device)
        evalset = splits[1].subset(spec.sweep.eval_subset, seed=SUBSET_SEED)
        fill_gate_means(models, train_split=splits[0])
        result.sweep = run_sweep(
            models,
            attacks,
            spec.sweep.epsilons,
            evalset,
            out,
            **spec.sweep.run_options(),
            device=device,
            progress=progress,
            log=log,
            layout=layout,
        )
        result.timings["sweep"] = time.perf_counter() - t0
        if not layout.is_main:
            return result
        _write_manifest(out / "manifest.json", result, device, layout)  # the report shows these timings
        from .report import build_report

        t0 = time.perf_counter()
        result.report = build_report(
            out,
            n_boot=spec.report.bootstrap,
            alpha=spec.report.alpha,
            gallery_eps=spec.report.gallery_eps,
            seed=spec.report.seed,
            log=log,
        )
        result.timings["report"] = time.perf_counter() - t0
    if layout.is_main:
        _write_manifest(out / "manifest.json", result, device, layout)
    return result


def _model_row(label: str, arch: str, arm: str, seed: int, meta: dict[str, Any], checkpoint: PathLike) -> ModelRow:
    info = model_info(arch)
    n = int(meta.get("eval_examples") or 0)
    acc = float(meta.get("clean_accuracy") or float("nan"))
    lo, hi = wilson_interval(round(acc * n), n) if n else (float("nan"), float("nan"))
    return ModelRow(
        label, arch, info.family, info.has_se, arm, seed, acc, lo, hi, n,
        float(meta.get("train_seconds") or 0.0), str(checkpoint),
    )  # fmt: skip


def _given_models(patterns: tuple[str, ...]) -> list[ModelRow]:
    """Rows for checkpoints named in ``models.checkpoints`` (twins and seeds from their metadata)."""
    from .checkpoint import read_metadata

    rows: list[ModelRow] = []
    for sm in _expand(list(patterns)):
        meta = read_metadata(sm)
        arch = meta.get("arch")
        if not isinstance(arch, str):
            raise SpecError(f"models.checkpoints: {sm} has no robustse metadata (architecture unknown)")
        seed = int(meta.get("seed", len(rows)))
        rows.append(_model_row(sm.name.removesuffix(".safetensors"), arch, "main", seed, meta, sm))
    return rows


def _expand(paths: list[str]) -> list[Path]:
    """Paths with globs expanded (sorted).

    Raises:
        SpecError: a glob that matches nothing or is malformed.
    """
    files: list[Path] = []
    for p in paths:
        if any(c in p for c in "*?["):
            try:
                matched = sorted(Path().glob(p)) if not Path(p).is_absolute() else sorted(Path("/").glob(p[1:]))
            except ValueError as exc:
                raise SpecError(f"bad checkpoint pattern {p!r} ({exc})") from None
            if not matched:
                raise SpecError(f"no checkpoint matches {p!r}")
            files += matched
        else:
            files.append(Path(p))
    return files


def load_sweep_models(
    paths: list[str], *, device: torch.device | str = "cpu", num_classes: int = 10
) -> list[SweepModel]:
    """Load checkpoints as sweep models labelled by file stem.

    Each entry is a robustse checkpoint path, a glob of them, or ``ARCH=WEIGHTS`` for foreign
    weights of a registry architecture (``resnet20=weights.pth``, ``torchvision:resnet18=w.pth``),
    loaded safely with ``num_classes`` classes.

    Raises:
        SpecError: a glob that matches nothing, or two checkpoints with the same label.
        CheckpointError: a missing, corrupt or unsafe checkpoint.
    """
    models = []
    files: list[Path] = []
    for p in paths:
        arch, eq, weights = p.rpartition("=")
        if eq and arch and not Path(p).exists():
            model, meta = load_checkpoint(
                weights, arch=arch, arch_kwargs={"num_classes": num_classes}, map_location=device
            )
            stem = Path(weights).name.rsplit(".", 1)[0]
            models.append(SweepModel(f"{arch.replace(':', '-')}@{stem}", model, weights, meta))
            continue
        files += _expand([p])
    for f in files:
        model, meta = load_checkpoint(f, map_location=device)
        models.append(SweepModel(f.name.removesuffix(".safetensors"), model, str(f), meta))
    labels = [m.label for m in models]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise SpecError(f"two checkpoints are both named {dupes[0]!r}: rename one")
    return models


def fill_gate_means(
    models: list[SweepModel],
    *,
    train_split: Dataset | None = None,
    data_root: PathLike | None = None,
    download: bool = False,
    log: Callable[[str], None] | None = None,
) -> None:
    """Give every SE model without stored training-set mean excitations (older or foreign
    checkpoints) the means over its training split, for the ``frozen_mean`` intervention.

    A model whose training data cannot be loaded keeps none, and ``frozen_mean`` is skipped for it.
    """
    from .probes import find_gates
    from .train import training_gate_means

    splits: dict[str, Dataset | DataError] = {}  # training splits by dataset name, loaded once
    for m in models:
        if m.gate_means is not None or not find_gates(m.model):
            continue
        train: Dataset | DataError | None = train_split
        if train is None:
            name = m.meta.get("dataset") or "fashion-mnist"
            if name not in splits:
                try:
                    splits[name] = load_dataset(name, split="train", root=data_root, download=download)
                except DataError as exc:
                    splits[name] = exc
            train = splits[name]
        if isinstance(train, DataError):
            if log:
                log(f"{m.label}: no training data for frozen_mean ({train}); that intervention is skipped")
            continue
        m.gate_means = training_gate_means(m.model, train.subset(m.meta.get("train_examples"), seed=SUBSET_SEED))


def sweep_dataset(
    models: list[SweepModel], cfg: SweepConfig, *, data_root: PathLike | None = None, download: bool = False
) -> Dataset:
    """The evaluation set of a sweep: the models' common dataset, test split, seeded subset.

    Raises:
        DataError: the models were trained on different datasets, or images do not fit them.
    """
    names = {m.meta.get("dataset") or "fashion-mnist" for m in models}
    if len(names) != 1:
        raise DataError(f"the models were trained on different datasets ({', '.join(sorted(names))})")
    name = str(names.pop())
    ds = load_dataset(name, split="test", root=data_root, download=download).subset(cfg.eval_subset, seed=SUBSET_SEED)
    for m in models:
        expected = m.meta.get("arch_kwargs", {}).get("in_channels")
        if expected is not None and expected != ds.in_channels:
            raise DataError(f"{name} images have {ds.in_channels} channel(s) but {m.label} takes {expected}")
    return ds


def _write_rows(path: Path, rows: list[ModelRow]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ModelRow.__dataclass_fields__))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def git_commit() -> str | None:
    """The commit of the robustse checkout, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _write_manifest(path: Path, result: ExperimentResult, device: torch.device | str, layout: Dist = SINGLE) -> None:
    manifest = {
        "spec": result.spec.name,
        "seeds": list(result.spec.seeds),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
        "world_size": layout.world,
        "threads": torch.get_num_threads(),
        "timings_seconds": {k: round(v, 3) for k, v in result.timings.items()},
        "models": [asdict(r) for r in result.rows],
    }
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def dump_toml(data: dict[str, Any]) -> str:
    """Write the simple nested structure of a spec as TOML (scalars, lists, tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    tables = []
    for k, v in data.items():
        if isinstance(v, dict):
            body = [f"{kk} = {value(vv)}" for kk, vv in v.items() if vv is not None]
            tables.append(f"[{k}]\n" + "\n".join(body))
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"
