"""Frozen configuration dataclasses and strict TOML loading.

Defaults live on the dataclasses. Loading is strict: an unknown key, a value of
the wrong type or an out-of-range value raises :class:`SpecError` naming the file
and the dotted key, so a typo in a spec never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from robustse.core.errors import SpecError
from robustse.core.strict import dump_toml, from_mapping  # noqa: F401  (dump_toml: part of the spec API)
from robustse.core.types import INTERVENTIONS, MAX_MODELS, MAX_RUNGS


def check_run_name(name: str) -> str:
    """Refuse run names that are empty or would escape the output root."""
    bad = not name or name in {".", ".."} or not name.isprintable() or any(c in name for c in "/\\") or name[0] == "."
    if bad:
        raise SpecError(f"invalid run name {name!r}: use letters, digits, '-', '_' (no path separators)")
    return name


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024  # an image folder's training size (README "Image folders")


@dataclass(frozen=True)
class DataConfig:
    """Which data to use and how much of it.

    Args:
        dataset: registry name (``robustse.data.list_datasets()``).
        data_root: folder holding the files; ``None`` uses the dataset's default places.
        download: let torchvision download missing files (needs internet).
        train_subset: train on this many examples (seeded, deterministic); ``None`` = all.
        eval_subset: evaluate on this many test examples; ``None`` = all.
        image_size: the side of the square images an ``imagefolder:DIR`` dataset is trained and
            evaluated at (each photo's shorter side resized to it, then the centre square);
            ``None`` = 64. Registered datasets keep their own size.
    """

    dataset: str = "fashion-mnist"
    data_root: str | None = None
    download: bool = False
    train_subset: int | None = None
    eval_subset: int | None = None
    image_size: int | None = None

    def __post_init__(self) -> None:
        for key in ("train_subset", "eval_subset"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise SpecError(f"data.{key} must be >= 1 (got {value})")
        if self.image_size is not None:
            if not self.dataset.startswith("imagefolder:"):
                raise SpecError(f"data.image_size is for imagefolder:DIR datasets ({self.dataset} has its own size)")
            if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
                raise SpecError(
                    f"data.image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] (got {self.image_size})"
                )


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (SGD + Nesterov momentum, one-cycle or cosine schedule).

    Args:
        epochs: passes over the training set.
        batch_size: examples per SGD step.
        lr: peak learning rate of the schedule.
        momentum: Nesterov momentum.
        weight_decay: L2 penalty on all parameters.
        schedule: ``onecycle`` (warm-up then anneal) or ``cosine``.
        augment: random crop (pad 2 px on 28 px, 4 px on 32 px) and, where labels allow, flips.
        adv_eps: if > 0, fast adversarial training (FGSM with random start, Wong et al. 2020)
            at this Linf epsilon in pixel units.
        eval_batch_size: batch size of the per-epoch evaluation.
        amp: mixed precision for training only (bfloat16 autocast on CPU, float16 with loss
            scaling on CUDA); attacks and evaluation stay float32.
        compile: run the training steps through ``torch.compile``: ``auto`` (where measured to
            pay: SE and static-gate models on a CPU in the default layout, runs of 5,000+ steps;
            :mod:`robustse.training.compiled`), ``on`` or ``off``. The same function up to
            float rounding; not part of a checkpoint's fingerprint.
        channels_last: hold weights and activations in channels_last memory layout while
            training: ``auto`` (on a CPU, where it measured 1.4-1.5x faster for the small twins),
            ``on`` or ``off``. The same function up to float rounding; not part of a checkpoint's
            fingerprint (checkpoints are saved in the default layout).
    """

    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    augment: bool = True
    adv_eps: float = 0.0
    eval_batch_size: int = 512
    amp: bool = False
    compile: Literal["auto", "on", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"train.epochs must be >= 1 (got {self.epochs})"),
            (self.batch_size >= 1, f"train.batch_size must be >= 1 (got {self.batch_size})"),
            (self.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1 (got {self.eval_batch_size})"),
            (0 < self.lr < math.inf, f"train.lr must be a finite number > 0 (got {self.lr})"),
            (0 <= self.momentum < 1, f"train.momentum must be in [0, 1) (got {self.momentum})"),
            (
                0 <= self.weight_decay < math.inf,
                f"train.weight_decay must be a finite number >= 0 (got {self.weight_decay})",
            ),
            (0 <= self.adv_eps <= 1, f"train.adv_eps must be in [0, 1] (got {self.adv_eps})"),
            (
                self.compile in ("auto", "on", "off"),
                f"train.compile must be one of auto, on, off (got {self.compile!r})",
            ),
            (
                self.channels_last in ("auto", "on", "off"),
                f"train.channels_last must be one of auto, on, off (got {self.channels_last!r})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SpecError(message)


@dataclass(frozen=True)
class ModelsConfig:
    """Which twin pairs an experiment trains (or loads).

    Args:
        twins: plain architecture names; each is trained together with its ``se_`` twin.
        se_options: SE keyword options for the SE twin (``reduction``, ``squeeze``, ``gate``).
        checkpoints: robustse checkpoints (paths or globs) to evaluate instead of training; twins
            and seeds are read from their metadata.
        static: also train the static-gate control ``static_<family>`` of every pair (a learned
            per-channel scale in each SE site, no input dependence), with the same seeds.
        batch_seeds: train the seeds of each architecture as one stacked network (README
            "Performance": seed batching; per-seed checkpoints as usual; single process only).
            Default (unset): on a GPU only — on a 2-core CPU the grouped convolutions are slower
            than one model at a time (measured).
    """

    twins: tuple[str, ...] = ("small_cnn",)
    se_options: dict[str, Any] = field(default_factory=dict)
    checkpoints: tuple[str, ...] = ()
    static: bool = False
    batch_seeds: bool | None = None

    def __post_init__(self) -> None:
        if not self.twins:
            raise SpecError("models.twins must name at least one architecture")
        if len(self.checkpoints) > MAX_MODELS:
            raise SpecError(f"models.checkpoints lists {len(self.checkpoints):,} entries; the limit is {MAX_MODELS:,}")


@dataclass(frozen=True)
class ArmConfig:
    """One arm of a study: a training regime or SE variant in which SE is compared with plain.

    Args:
        name: arm name (letters, digits, ``-``, ``_``); part of the model labels when a spec has
            several arms.
        train: overrides of ``[train]`` for this arm (e.g. ``{adv_eps = 0.1}`` for adversarial
            training).
        se_options: overrides of ``models.se_options`` for this arm's SE twin (e.g.
            ``{reduction = 2}``).
        plain: train this arm's own plain twin. ``false`` (an SE-only arm such as an r-ablation)
            compares its SE models with the plain twins of the first arm, which needs the same
            training (no ``train`` overrides).
    """

    name: str = "main"
    train: dict[str, Any] = field(default_factory=dict)
    se_options: dict[str, Any] = field(default_factory=dict)
    plain: bool = True

    def __post_init__(self) -> None:
        check_run_name(self.name)
        if not self.plain and self.train:
            raise SpecError(
                f"arms.{self.name}: an arm without its own plain twin (plain = false) cannot change training"
            )


MAX_BOOTSTRAP = 100_000  # replicates of a report's intervals (README "Reliability": limits)

# The measurements the report compares between twins (README "Statistics and the verdict").
MEASUREMENTS = (
    "robust_accuracy", "logit_sensitivity", "kl", "flip_rate", "log_sensitivity_vs_noise", "amplification_last_block",
    "logit_sensitivity_calibrated", "kl_calibrated",
)  # fmt: skip

DEFAULT_ATTACKS: tuple[dict[str, Any], ...] = ({"name": "fgsm"}, {"name": "pgd", "steps": 10}, {"name": "noise"})


@dataclass(frozen=True)
class SweepConfig:
    """An attack sweep: every model × attack × eps on one evaluation set.

    Args:
        epsilons: the eps ladder in pixel units (of each attack's norm); 0 is added if missing.
        attacks: tables ``{name = "pgd", steps = 10, ...}`` (``robustse attacks`` lists options).
        norm: default norm of the attacks (``linf`` or ``l2``).
        eval_subset: attack this many test images (seeded subset); ``None`` = the whole test split.
        batch_size: examples per attack call.
        accuracy_only: larger eps attack only the examples that survived smaller ones.
        seed: default seed of the attacks' random starts.
        probes: record sensitivity, gate/block drift and the interventions (off with accuracy_only).
        interventions: gate interventions attacked white-box as models of their own, beside every
            SE model: ``held_gates``, ``frozen_mean`` (needs probes; none by default).
        seed_batching: attack the seeds of one architecture at once through one stacked network
            (default: on a GPU only; see :func:`robustse.experiment.sweep.run_sweep`).
        probe_subsample: leading examples whose per-gate/block values are kept for the bootstrap.
        models: checkpoint paths or globs (``robustse sweep --spec``; experiments use their own models).
        channels_last: convert the models to channels_last memory layout for the whole sweep
            (the attacks' gradient passes use it on a CPU anyway; equal up to float rounding, see
            :func:`robustse.experiment.sweep.run_sweep`).
        dataset: evaluate on this dataset (a registered name or ``imagefolder:DIR``) instead of
            the models' own (``robustse sweep --spec``; an experiment evaluates on ``[data]``).
        pass_rows: take input gradients and record probes this many rows of a batch at a time:
            less memory for full-size images, results equal up to float rounding (None: as many
            as fit the device's pass budget, :func:`robustse.attacks.pass_memory`).
        compile: run the attacks' forward and backward passes through ``torch.compile``: ``auto``
            (where measured to pay, :mod:`robustse.attacks.compiled`), ``on`` or ``off``; probe
            passes and gate interventions stay eager. Equal up to float rounding.
    """

    epsilons: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1)
    attacks: tuple[dict[str, Any], ...] = DEFAULT_ATTACKS
    norm: Literal["linf", "l2"] = "linf"
    eval_subset: int | None = 1000
    batch_size: int = 256
    accuracy_only: bool = False
    seed: int = 0
    probes: bool = True
    probe_subsample: int = 256
    models: tuple[str, ...] = ()
    channels_last: bool = False
    interventions: tuple[str, ...] = ()
    seed_batching: bool | None = None
    dataset: str | None = None
    pass_rows: int | None = None
    compile: Literal["auto", "on", "off"] = "auto"

    def run_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`robustse.experiment.sweep.run_sweep` that this table sets."""
        keys = ("batch_size", "accuracy_only", "probes", "probe_subsample", "channels_last", "seed_batching",
                "pass_rows", "compile")  # fmt: skip
        return {k: getattr(self, k) for k in keys}

    def __post_init__(self) -> None:
        if self.probe_subsample < 1:
            raise SpecError(f"sweep.probe_subsample must be >= 1 (got {self.probe_subsample})")
        unknown = sorted(set(self.interventions) - set(INTERVENTIONS))
        if unknown:
            raise SpecError(f"sweep.interventions: unknown {unknown[0]!r} (valid: {', '.join(INTERVENTIONS)})")
        if not self.epsilons:
            raise SpecError("sweep.epsilons must list at least one eps")
        if len(self.epsilons) > MAX_RUNGS:
            raise SpecError(f"sweep.epsilons lists {len(self.epsilons):,} epsilons; the limit is {MAX_RUNGS:,}")
        for e in self.epsilons:
            if not math.isfinite(e) or e > 1e6:
                raise SpecError(f"sweep.epsilons: {e} is not a finite number <= 1e6")
            if e < 0 or (self.norm == "linf" and e > 1):
                raise SpecError(f"sweep.epsilons: {e} is outside [0, 1]" if e >= 0 else f"sweep.epsilons: {e} < 0")
        if not self.attacks:
            raise SpecError("sweep.attacks must list at least one attack")
        if self.batch_size < 1:
            raise SpecError(f"sweep.batch_size must be >= 1 (got {self.batch_size})")
        if self.pass_rows is not None and self.pass_rows < 1:
            raise SpecError(f"sweep.pass_rows must be >= 1 (got {self.pass_rows})")
        if self.eval_subset is not None and self.eval_subset < 1:
            raise SpecError(f"sweep.eval_subset must be >= 1 (got {self.eval_subset})")
        if self.compile not in ("auto", "on", "off"):
            raise SpecError(f"sweep.compile must be one of auto, on, off (got {self.compile!r})")
        if 0.0 not in self.epsilons:
            object.__setattr__(self, "epsilons", (0.0, *self.epsilons))


@dataclass(frozen=True)
class ReportConfig:
    """What the report shows and how its statistics are computed.

    Args:
        bootstrap: replicates of the descriptive bootstrap bands and the channel-gain table (the
            verdicts are t intervals over seed pairs and do not use it).
        alpha: significance level of the Holm-corrected paired tests (and 1 − CI level).
        gallery_eps: eps of the adversarial-example gallery and the excitation heatmaps
            (default: the middle of the ladder).
        seed: seed of the bootstrap draws.
        primary: the primary endpoint (default: worst-case robust accuracy), Holm-corrected across
            its eps; every other measurement is secondary (exploratory).
        margins: equivalence margins per measurement, over the defaults (``robust_accuracy`` and
            ``flip_rate`` 0.01, ``log_sensitivity_vs_noise`` 0.05).
    """

    bootstrap: int = 2000
    alpha: float = 0.05
    gallery_eps: float | None = None
    seed: int = 0
    primary: str = "robust_accuracy"
    margins: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 100 <= self.bootstrap <= MAX_BOOTSTRAP:
            raise SpecError(f"report.bootstrap must be in [100, {MAX_BOOTSTRAP:,}] (got {self.bootstrap})")
        if not 0 < self.alpha < 0.5:
            raise SpecError(f"report.alpha must be in (0, 0.5) (got {self.alpha})")
        if self.primary not in MEASUREMENTS:
            raise SpecError(f"report.primary: unknown measurement {self.primary!r} (valid: {', '.join(MEASUREMENTS)})")
        for name, m in self.margins.items():
            if name not in MEASUREMENTS or not isinstance(m, (int, float)) or isinstance(m, bool) or not m > 0:
                valid = ", ".join(MEASUREMENTS)
                raise SpecError(f"report.margins: {name} = {m!r} (want a measurement of {valid} and a number > 0)")


@dataclass(frozen=True)
class ExperimentSpec:
    """A whole experiment: data, models, seeds, training and (optionally) an attack sweep."""

    name: str = "experiment"
    seeds: tuple[int, ...] = (0,)
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig | None = None
    arms: tuple[ArmConfig, ...] = field(default_factory=lambda: (ArmConfig(),))
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise SpecError("seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise SpecError(f"seeds must be distinct (got {list(self.seeds)})")
        wild = [s for s in self.seeds if not 0 <= s < 2**31]
        if wild:
            raise SpecError(f"seeds must be integers in [0, 2^31) (got {wild[0]})")
        check_run_name(self.name)
        if not self.arms:
            raise SpecError("arms must list at least one arm")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise SpecError(f"arm names must be distinct (got {names})")
        if not self.arms[0].plain:
            raise SpecError(f"arms.{names[0]}: the first arm must train its plain twin (plain = true)")
        for i, arm in enumerate(self.arms):  # overrides must make a valid training configuration
            merged = {**dataclasses.asdict(self.train), **arm.train}
            from_mapping(TrainConfig, merged, where=f"arms[{i}].train")

    def arm_train(self, arm: ArmConfig) -> TrainConfig:
        """The training configuration of ``arm`` (``[train]`` with the arm's overrides)."""
        return dataclasses.replace(self.train, **arm.train)

    def arm_se_options(self, arm: ArmConfig) -> dict[str, Any]:
        """SE options of ``arm``'s SE twin."""
        return {**self.models.se_options, **arm.se_options}


# --------------------------------------------------------------------------- loading


def load_spec(path: str | Path) -> ExperimentSpec:
    """Load an experiment spec from a TOML file, strictly.

    The spec's ``name`` defaults to the file's stem.

    Raises:
        SpecError: naming the file on a missing file, invalid TOML, unknown key or bad value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read spec ({exc.__class__.__name__})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise SpecError(f"{path}: arrays or tables nested too deeply") from None
    raw.setdefault("name", path.stem)
    try:
        return from_mapping(ExperimentSpec, raw)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
