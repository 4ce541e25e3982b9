"""``experiment``: spec → trained (or loaded) twins over seeds and arms → sweep with probes →
statistics and the verdict → report, in one run directory.

Every stage is resumable: trained checkpoints are reused when their configuration matches, an
interrupted training run resumes from its last epoch, finished sweep cells are skipped, and the
report is regenerated from the store. ``manifest.json`` records versions, seeds, the git commit,
the device and the time of every phase.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from robustse.analysis.stats import wilson_interval
from robustse.core.config import ArmConfig, DataConfig, ExperimentSpec, dump_toml, load_spec
from robustse.core.distributed import SINGLE, Dist
from robustse.core.errors import SpecError
from robustse.core.files import write_text
from robustse.core.progress import eta
from robustse.core.provenance import run_provenance
from robustse.core.types import PathLike
from robustse.data.base import Dataset
from robustse.data.datasets import dataset_info
from robustse.data.folder import is_image_folder, training_preprocess
from robustse.experiment.setup import expand_paths, prepare_out_dir, sweep_checkpoints
from robustse.experiment.sweep import SweepResult, build_attacks, ladder_of
from robustse.models import family_members, model_info
from robustse.training.train import load_splits, train_model


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
    kind: str = "plain"  # plain, se or static (the static-gate control)


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` produced."""

    spec: ExperimentSpec
    out_dir: Path
    rows: list[ModelRow] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    sweep: SweepResult | None = None
    report: Any = None  # robustse.analysis.report.ReportResult once the report is written


def twin_names(spec: ExperimentSpec) -> list[str]:
    """Every architecture the spec trains: each listed plain model, its SE twin and, with
    ``models.static``, its static-gate control."""
    names = []
    for plain in spec.models.twins:
        info = model_info(plain)
        if info.kind != "plain":
            raise SpecError(
                f"models.twins lists {plain!r}: name the plain twin ({info.family!r}); its SE twin is added"
            )
        members = family_members(info.family)  # the SE twin (and static control) must exist
        names += [plain, members["se"]] + ([members["static"]] if spec.models.static else [])
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
                if not arm.plain and not model_info(name).has_se:  # SE-only arm: no plain twin, no control
                    continue
                label = f"{name}_{arm.name}_s{seed}" if many else f"{name}_s{seed}"
                plan.append(PlannedModel(label, name, arm, seed))
    return plan


def run_experiment(
    spec: ExperimentSpec | PathLike,
    out_dir: PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    layout: Dist = SINGLE,
    debug: Callable[[str], None] | None = None,
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
        debug: receives the sweep's detail lines (cells to run, a line per finished cell).

    Returns:
        :class:`ExperimentResult` with one row per trained model (ranks other than 0: no report).

    Example:
        >>> run_experiment("attacks/quick.toml")  # doctest: +SKIP
    """
    run = _Run.start(spec, out_dir, device=device, progress=progress, log=log, layout=layout, debug=debug)
    splits = run.timed("data", lambda: load_splits(run.spec.data, training=not run.spec.models.checkpoints))
    run.result.rows = run.timed("train", lambda: run.models(splits))
    if layout.is_main:
        _write_rows(run.out / "models.csv", run.result.rows)
    if run.spec.sweep is not None:
        run.result.sweep = run.timed("sweep", lambda: run.sweep(splits))
        if not layout.is_main:
            return run.result
        run.write_manifest()  # the report shows these timings
        run.result.report = run.timed("report", run.report)
    if layout.is_main:
        run.write_manifest()
    return run.result


@dataclass
class _Run:
    """An experiment in progress: its spec, run directory, options and result so far."""

    result: ExperimentResult
    device: torch.device | str
    progress: bool
    log: Callable[[str], None] | None
    layout: Dist
    debug: Callable[[str], None] | None = None

    @property
    def spec(self) -> ExperimentSpec:
        return self.result.spec

    @property
    def out(self) -> Path:
        return self.result.out_dir

    @classmethod
    def start(cls, spec: ExperimentSpec | PathLike, out_dir: PathLike | None, **options: Any) -> _Run:
        """Load the spec, create the run directory and keep the spec in it (rank 0)."""
        spec_text = None
        if not isinstance(spec, ExperimentSpec):
            spec_text = Path(spec).read_text(encoding="utf-8") if Path(spec).is_file() else None
            spec = load_spec(spec)
        check_experiment(spec)  # a rejected spec changes nothing, not even the run's spec.toml
        out = Path(out_dir) if out_dir is not None else Path("reports") / spec.name
        layout: Dist = options["layout"]
        if layout.is_main:
            prepare_out_dir(out)
            text = spec_text if spec_text is not None else dump_toml(asdict(spec))
            write_text(out / "spec.toml", text)
        layout.barrier()
        return cls(ExperimentResult(spec, out), **options)

    def timed(self, phase: str, step: Callable[[], Any]) -> Any:
        """Run one phase, saying so, and record its time in ``result.timings``."""
        phases = ["data", "train", *(["sweep", "report"] if self.spec.sweep is not None else [])]
        self.say(f"phase {phases.index(phase) + 1}/{len(phases)}: {phase}")
        t0 = time.perf_counter()
        value = step()
        self.result.timings[phase] = time.perf_counter() - t0
        return value

    def models(self, splits: tuple[Any, Dataset]) -> list[ModelRow]:
        """The spec's given checkpoints, or every planned model trained (or reused)."""
        if self.spec.models.checkpoints:
            return _given_models(self.spec.models.checkpoints)
        plan = plan_models(self.spec)
        if not self._batch_seeds():
            return self.train_each(plan, splits)
        trained = self.train_groups(_seed_groups(plan), splits)
        return [self.row(pm, trained[pm.label]) for pm in plan]

    def train_groups(self, groups: list[list[PlannedModel]], splits: tuple[Dataset, Dataset]) -> dict[str, Any]:
        """Each group's seeds trained batched, with a line per epoch and per group: k / N and the
        time left (the mean time of the epochs so far; a reused checkpoint counts as the moment it took)."""
        epochs = [self.spec.arm_train(g[0].arm).epochs for g in groups]
        total, t0 = sum(epochs), time.perf_counter()
        trained: dict[str, Any] = {}
        for k, group in enumerate(groups):
            name = f"{group[0].arch} ×{len(group)} seeds ({group[0].arm.name}), group {k + 1}/{len(groups)}"

            def on_epoch(epoch: int, _records: Any, name: str = name, k: int = k) -> None:
                left = eta(time.perf_counter() - t0, sum(epochs[:k]) + epoch, total)
                self.say(f"train: {name}, epoch {epoch}/{epochs[k]}, about {left} left")

            labels = [pm.label for pm in group]
            trained.update(zip(labels, self.train_group(group, splits, on_epoch), strict=True))
            left = eta(time.perf_counter() - t0, sum(epochs[: k + 1]), total)
            self.say(f"train: {name} done, about {left} left")
        return trained

    def train_each(self, plan: list[PlannedModel], splits: tuple[Dataset, Dataset]) -> list[ModelRow]:
        """Every planned model in turn, with a line per model: k / N and the time left (the mean
        time of the models so far; a reused checkpoint counts as the moment it took)."""
        rows, t0 = [], time.perf_counter()
        for k, pm in enumerate(plan, 1):
            rows.append(self.train(pm, splits))
            elapsed = time.perf_counter() - t0
            self.say(f"train: model {k}/{len(plan)} done ({pm.label}), about {eta(elapsed, k, len(plan))} left")
        return rows

    def say(self, line: str) -> None:
        """A progress line (rank 0 only)."""
        if self.log and self.layout.is_main:
            self.log(line)

    def _batch_seeds(self) -> bool:
        """Seed batching: as the spec says, else on a GPU only; never under torchrun."""
        wanted = self.spec.models.batch_seeds
        if wanted is None:
            wanted = torch.device(self.device).type == "cuda"
        return wanted and not self.layout.active

    def train_group(self, group: list[PlannedModel], splits: tuple[Dataset, Dataset], on_epoch: Any) -> list[Any]:
        """The seeds of one architecture and arm, trained as one stacked network."""
        from robustse.training.seeds import train_seeds

        pm, spec = group[0], self.spec
        return train_seeds(
            pm.arch, outs=[self.out / "models" / f"{p.label}.safetensors" for p in group],
            seeds=[p.seed for p in group], data=spec.data, train=spec.arm_train(pm.arm),
            model_kwargs=_model_kwargs(spec, pm), device=self.device, progress=self.progress, log=self.log,
            splits=splits, on_epoch=on_epoch,
        )  # fmt: skip

    def train(self, pm: PlannedModel, splits: tuple[Dataset, Dataset]) -> ModelRow:
        """Train one planned model (resuming or reusing its checkpoint) and describe it."""
        spec = self.spec
        trained = train_model(
            pm.arch, out=self.out / "models" / f"{pm.label}.safetensors", data=spec.data,
            train=spec.arm_train(pm.arm), seed=pm.seed,
            model_kwargs=_model_kwargs(spec, pm),
            device=self.device, progress=self.progress, log=self.log, splits=splits, layout=self.layout,
        )  # fmt: skip
        return self.row(pm, trained)

    def row(self, pm: PlannedModel, trained: Any) -> ModelRow:
        """The models.csv row of a trained model (and its log line)."""
        row = _model_row(pm.label, pm.arch, pm.arm.name, pm.seed, trained.meta, trained.checkpoint)
        if self.log and self.layout.is_main:
            self.log(f"{pm.label}: clean accuracy {row.clean_accuracy:.4f} [{row.ci_low:.4f}, {row.ci_high:.4f}]")
        return row

    def sweep(self, splits: tuple[Any, Dataset]) -> SweepResult:
        """The spec's sweep over every model of the run."""
        assert self.spec.sweep is not None
        return sweep_checkpoints(
            [r.checkpoint for r in self.result.rows], self.spec.sweep, self.out, splits=splits,
            device=self.device, progress=self.progress, log=self.log, layout=self.layout, debug=self.debug,
        )  # fmt: skip

    def report(self) -> Any:
        """The report of the run directory (statistics, figures, HTML and Markdown)."""
        from robustse.analysis.report import build_report

        cfg = self.spec.report
        return build_report(
            self.out, n_boot=cfg.bootstrap, alpha=cfg.alpha, gallery_eps=cfg.gallery_eps, seed=cfg.seed, log=self.log
        )

    def write_manifest(self) -> None:
        """``manifest.json``: spec name, seeds, provenance, phase timings and the models."""
        manifest = {
            "spec": self.spec.name,
            "seeds": list(self.spec.seeds),
            **run_provenance(self.device, self.layout),
            "timings_seconds": {k: round(v, 3) for k, v in self.result.timings.items()},
            "models": [asdict(r) for r in self.result.rows],
        }
        write_text(self.out / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def check_experiment(spec: ExperimentSpec) -> None:
    """Everything about ``spec`` that can be checked before anything runs: architectures,
    dataset, attacks and their options, the ladder.

    Raises:
        SpecError, ModelError, DataError, AttackError: one line naming the problem.
    """
    twin_names(spec)  # unknown or SE names
    _check_preparation(spec.models.checkpoints, spec.data)
    if not is_image_folder(spec.data.dataset):
        dataset_info(spec.data.dataset)  # an unknown name, before anything is trained
    if spec.sweep is None:
        return
    if spec.sweep.dataset not in (None, spec.data.dataset):
        raise SpecError("sweep.dataset is for `robustse sweep --spec`; an experiment evaluates on [data] dataset")
    for atk in build_attacks(spec.sweep.attacks, norm=spec.sweep.norm, seed=spec.sweep.seed):
        ladder_of(atk, sorted(set(spec.sweep.epsilons)))


def _seed_groups(plan: list[PlannedModel]) -> list[list[PlannedModel]]:
    """The planned models grouped by architecture and arm (the seeds of one configuration)."""
    groups: dict[tuple[str, str], list[PlannedModel]] = {}
    for pm in plan:
        groups.setdefault((pm.arch, pm.arm.name), []).append(pm)
    return list(groups.values())


def _model_kwargs(spec: ExperimentSpec, pm: PlannedModel) -> dict[str, Any]:
    """Builder options of a planned model: the arm's SE options for SE twins, its gate function
    for a static control, none for a plain twin."""
    kind = model_info(pm.arch).kind
    options = spec.arm_se_options(pm.arm) if kind != "plain" else {}
    return options if kind == "se" else {k: v for k, v in options.items() if k == "gate"}


def _model_row(label: str, arch: str, arm: str, seed: int, meta: dict[str, Any], checkpoint: PathLike) -> ModelRow:
    info = model_info(arch)
    n = int(meta.get("eval_examples") or 0)
    acc = float(meta.get("clean_accuracy") or float("nan"))
    lo, hi = wilson_interval(round(acc * n), n) if n else (float("nan"), float("nan"))
    return ModelRow(
        label, arch, info.family, info.has_se, arm, seed, acc, lo, hi, n,
        float(meta.get("train_seconds") or 0.0), str(checkpoint), info.kind,
    )  # fmt: skip


def _given_models(patterns: tuple[str, ...]) -> list[ModelRow]:
    """Rows for checkpoints named in ``models.checkpoints`` (twins and seeds from their metadata)."""
    from robustse.models.checkpoint import read_metadata

    rows: list[ModelRow] = []
    for sm in expand_paths(list(patterns)):
        meta = read_metadata(sm)
        arch = meta.get("arch")
        if not isinstance(arch, str):
            raise SpecError(f"models.checkpoints: {sm} has no robustse metadata (architecture unknown)")
        seed = int(meta.get("seed", len(rows)))
        rows.append(_model_row(sm.name.removesuffix(".safetensors"), arch, "main", seed, meta, sm))
    return rows


def _check_preparation(patterns: tuple[str, ...], data: DataConfig) -> None:
    """An image folder is evaluated at ``[data] image_size``: refuse a given checkpoint trained at another."""
    from robustse.models.checkpoint import read_metadata, stored_preprocess

    if not is_image_folder(data.dataset):
        return
    wanted = training_preprocess(data.image_size)
    for path in expand_paths(list(patterns)):
        stored = stored_preprocess(read_metadata(path))
        if stored is not None and stored != wanted:
            (h, w), n = stored.size, wanted.size[0]
            raise SpecError(
                f"models.checkpoints: {path} was trained on photos prepared at {h}x{w}, but [data] image_size "
                f"prepares them at {n}x{n}: set image_size = {h} (or use checkpoints trained at {n})"
            )


def _write_rows(path: Path, rows: list[ModelRow]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(ModelRow.__dataclass_fields__))
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    write_text(path, buf.getvalue())
