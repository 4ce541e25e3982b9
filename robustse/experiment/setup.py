"""One sweep set-up for ``robustse sweep`` and ``experiment``: checkpoints → loaded models,
attacks, the evaluation set and the training-set gate means → :func:`robustse.experiment.sweep.run_sweep`."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from robustse.core.config import SweepConfig
from robustse.core.distributed import SINGLE, Dist
from robustse.core.errors import DataError, SpecError
from robustse.core.files import own_dir
from robustse.core.types import INTERVENTIONS, MAX_MODELS, PathLike, intervention_label
from robustse.data.base import Dataset
from robustse.data.datasets import load_split
from robustse.data.folder import ImageFolder, dataset_identity
from robustse.experiment.sweep import SweepModel, SweepResult, build_attacks, run_sweep
from robustse.models.checkpoint import load_checkpoint
from robustse.models.external import Preprocess
from robustse.models.gates import find_gates
from robustse.probes.capture import fixed_gates, held_gates
from robustse.training.predict import check_input_fits, fit_temperature, logits_of
from robustse.training.train import SUBSET_SEED, training_gate_means


def sweep_checkpoints(
    paths: list[str],
    cfg: SweepConfig,
    out: Path,
    *,
    splits: tuple[Dataset | ImageFolder, Dataset] | None = None,
    data_root: PathLike | None = None,
    num_classes: int | None = None,
    dataset: str | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    debug: Callable[[str], None] | None = None,
    layout: Dist = SINGLE,
) -> SweepResult:
    """Load the checkpoints ``paths`` and run the sweep ``cfg`` on them into ``out``.

    Args:
        paths: checkpoint paths, globs or ``ARCH=WEIGHTS`` (:func:`load_sweep_models`).
        cfg: the ``[sweep]`` table (attacks, eps ladder, evaluation subset, options).
        splits: the (train, test) splits the models were trained on, when the caller holds them
            (an experiment); otherwise the models' dataset is loaded from ``data_root``.
        num_classes: classes of foreign ``ARCH=WEIGHTS`` models (default: the dataset's, or 10).
        dataset: evaluate on this dataset (e.g. ``imagefolder:DIR``) instead of the models' own.
        device, progress, log, debug, layout: as for :func:`robustse.experiment.sweep.run_sweep`.
    """
    dataset = dataset or cfg.dataset
    given, classes = given_dataset(dataset if splits is None else None, num_classes, data_root)
    models = load_sweep_models(paths, device=device, num_classes=classes)
    warn_nonfinite(models, log)
    attacks = build_attacks(cfg.attacks, norm=cfg.norm, seed=cfg.seed)
    test = splits[1] if splits is not None else load_test_split(models, data_root=data_root, given=given, log=log)
    evalset = evaluation_set(models, test, cfg)
    try_attacks_first(models[0], attacks, evalset, cfg.epsilons, device)
    if cfg.probes and not cfg.accuracy_only:  # frozen_mean, calibration and interventions are probes
        train = None if splits is None else splits[0]
        fill_gate_means(models, train_split=train, data_root=data_root, dataset=dataset, log=log)
        fit_temperatures(models, test.held_out(cfg.eval_subset, seed=SUBSET_SEED), device=device, log=log)
        models += intervention_models(models, cfg.interventions)
    if layout.is_main:
        out = prepare_out_dir(out)
    layout.barrier()
    return run_sweep(
        models, attacks, cfg.epsilons, evalset, out, **cfg.run_options(),
        device=device, progress=progress, log=log, debug=debug, layout=layout,
    )  # fmt: skip


def try_attacks_first(
    sm: SweepModel, attacks: Sequence[Any], evalset: Dataset, epsilons: Sequence[float], device: torch.device | str
) -> None:
    """Run every torchattacks attack once on two evaluation images before anything is stored:
    option values that only torchattacks' own code checks (``Square(loss=foo)``) are refused
    up front instead of after the cells of other attacks were written.

    Raises:
        AttackError: the attack's one-line refusal.
    """
    from robustse.attacks.adapter import TorchattacksAttack
    from robustse.data.base import to_float

    eps = [e for e in sorted(epsilons) if e > 0][:1]
    x, y = to_float(evalset.x[:2]).to(device), evalset.y[:2].to(device)
    for atk in attacks:
        if isinstance(atk, TorchattacksAttack) and eps:
            atk(sm.model, x, y, epsilons=eps)


def nonfinite_weights(model: torch.nn.Module) -> int:
    """How many parameter and buffer values of ``model`` are NaN or infinite."""
    return sum(int((~torch.isfinite(t)).sum()) for t in model.state_dict().values() if t.is_floating_point())


def warn_nonfinite(models: list[SweepModel], log: Callable[[str], None] | None) -> None:
    """Say which models hold non-finite weights (their cells will fail the no_nan_inf check)."""
    for m in models:
        bad = nonfinite_weights(m.model)
        if bad and log:
            log(f"warning: {m.label}: {bad} non-finite weight value(s); its results will be NaN")


def prepare_out_dir(out_dir: Path) -> Path:
    """Create the run directory (refusing a path that is a file or cannot be written)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SpecError(f"output path {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)  # the run directory itself may be a link the user chose
        own_dir(out_dir / "models")
        with tempfile.TemporaryFile(dir=out_dir):  # an unnamed file: nothing to plant a link at
            pass
    except OSError as exc:
        raise SpecError(f"output directory {out_dir} is not writable ({exc.strerror or exc})") from None
    return out_dir


def expand_paths(paths: list[str]) -> list[Path]:
    """Paths with globs expanded (sorted); a name that exists as it is is taken literally, even when
    it holds glob characters.

    Raises:
        SpecError: a glob that matches nothing or is malformed.
    """
    if len(paths) > MAX_MODELS:
        raise SpecError(f"{len(paths):,} checkpoints given; the limit is {MAX_MODELS:,}")
    files: list[Path] = []
    for p in paths:
        if any(c in p for c in "*?[") and not Path(p).exists():
            try:
                matched = sorted(Path().glob(p)) if not Path(p).is_absolute() else sorted(Path("/").glob(p[1:]))
            except ValueError as exc:
                raise SpecError(f"bad checkpoint pattern {p!r} ({exc})") from None
            if not matched:
                raise SpecError(f"no checkpoint matches {p!r}")
            files += matched
        else:
            files.append(Path(p))
        if len(files) > MAX_MODELS:
            raise SpecError(f"the checkpoints given match over {MAX_MODELS:,} files; the limit is {MAX_MODELS:,}")
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
        foreign = arch_and_weights(p)
        if foreign is not None:
            arch, weights = foreign
            model, meta = load_checkpoint(
                weights, arch=arch, arch_kwargs={"num_classes": num_classes}, map_location=device
            )
            stem = Path(weights).name.rsplit(".", 1)[0]
            models.append(SweepModel(f"{arch.replace(':', '-')}@{stem}", model, weights, meta))
            continue
        files += expand_paths([p])
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
    train_split: Dataset | ImageFolder | None = None,
    data_root: PathLike | None = None,
    download: bool = False,
    dataset: str | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Give every SE model without stored training-set mean excitations (older or foreign
    checkpoints) the means over its training split (``dataset``'s, when given), for the
    ``frozen_mean`` intervention. An image folder's training split gives the means of a seeded
    subset of ``FOLDER_GATE_MEAN_IMAGES`` images.

    A model whose training data cannot be loaded keeps none, and ``frozen_mean`` is skipped for it.
    """
    splits: dict[str, Any] = {}  # training splits (or why there is none) by dataset name, loaded once
    for m in models:
        if m.gate_means is not None or not find_gates(m.model):
            continue
        train: Any = train_split
        if train is None:
            name = dataset or m.meta.get("dataset") or "fashion-mnist"
            if name not in splits:
                splits[name] = _training_split(name, data_root, download, _preprocess_of([m]))
            train = splits[name]
        if isinstance(train, DataError):
            if log:
                log(f"{m.label}: no training data for frozen_mean ({train}); that intervention is skipped")
            continue
        n = m.meta.get("train_examples") if isinstance(train, Dataset) else FOLDER_GATE_MEAN_IMAGES
        m.gate_means = training_gate_means(m.model, train.subset(n, seed=SUBSET_SEED))


FOLDER_GATE_MEAN_IMAGES = 2000


def _training_split(name: str, data_root: PathLike | None, download: bool, preprocess: Preprocess) -> Any:
    """The training split (or its image-folder listing) of ``name``, or the DataError saying why not."""
    try:
        return load_split(name, split="train", root=data_root, download=download, preprocess=preprocess)
    except DataError as exc:
        return exc


def sweep_dataset(
    models: list[SweepModel],
    cfg: SweepConfig,
    *,
    data_root: PathLike | None = None,
    download: bool = False,
    dataset: str | None = None,
) -> Dataset:
    """The evaluation set of a sweep: the models' common dataset (or ``dataset``), test split,
    seeded subset.

    Raises:
        DataError: the models were trained on different datasets, or images do not fit them.
    """
    given = load_split(dataset, root=data_root, download=download) if dataset else None
    return evaluation_set(models, load_test_split(models, data_root=data_root, download=download, given=given), cfg)


def load_drift_input(
    checkpoint: str,
    cfg: SweepConfig,
    dataset: str | None,
    num_classes: int | None,
    data_root: PathLike | None,
    device: torch.device | str,
) -> tuple[SweepModel, Dataset]:
    """``robustse drift``'s model (a checkpoint or ``ARCH=WEIGHTS``) and its evaluation images."""
    given, classes = given_dataset(dataset, num_classes, data_root)
    (sm,) = load_sweep_models([checkpoint], device=device, num_classes=classes)
    return sm, evaluation_set([sm], load_test_split([sm], data_root=data_root, given=given), cfg)


def given_dataset(
    dataset: str | None, num_classes: int | None, data_root: PathLike | None, download: bool = False
) -> tuple[Dataset | ImageFolder | None, int]:
    """The test split of the dataset named on the command line (an image folder only listed),
    and the class count of foreign ``ARCH=WEIGHTS`` models: as given, else the dataset's, else 10."""
    given = load_split(dataset, root=data_root, download=download) if dataset else None
    return given, num_classes or (given.num_classes if given is not None else 10)


def arch_and_weights(text: str) -> tuple[str, str] | None:
    """``ARCH=WEIGHTS`` → (ARCH, WEIGHTS), split at the first ``=`` (an architecture name has
    none, a path may); None for a path (an existing file named with ``=`` included)."""
    arch, eq, weights = text.partition("=")
    return (arch, weights) if eq and arch and not Path(text).exists() else None


def load_test_split(
    models: list[SweepModel],
    *,
    data_root: PathLike | None = None,
    download: bool = False,
    given: Dataset | ImageFolder | None = None,
    log: Callable[[str], None] | None = None,
) -> Dataset | ImageFolder:
    """The test split of the models' common dataset, or ``given``; an image folder's listing is
    prepared the way the models want (:func:`_preprocess_of`).

    Raises:
        DataError: the models were trained on different datasets.
    """
    if given is None:
        names = {dataset_identity(str(m.meta.get("dataset") or "fashion-mnist")) for m in models}
        if len(names) != 1:
            raise DataError(f"the models were trained on different datasets ({', '.join(sorted(names))})")
        name = str(names.pop())
        given = load_split(name, split="test", root=data_root, download=download, preprocess=_preprocess_of(models))
    if isinstance(given, ImageFolder):
        given.preprocess = _preprocess_of(models, log)
    return given


def _preprocess_of(models: list[SweepModel], log: Callable[[str], None] | None = None) -> Preprocess:
    """How the models want full-size images prepared (an image folder's). Paired comparisons need
    the same images for every model: when the models want different preparations, all get the
    first model's (and ``log`` says so)."""
    wanted = list(dict.fromkeys(p for m in models if isinstance(p := getattr(m.model, "preprocess", None), Preprocess)))
    if len(wanted) > 1 and log:
        ways = ", ".join(f"{p.size[0]}x{p.size[1]}/{p.crop_pct:g}/{p.interpolation}" for p in wanted)
        log(f"the models want images prepared differently ({ways}); every model sees the first's, the same images")
    return wanted[0] if wanted else Preprocess()


def evaluation_set(models: list[SweepModel], test: Dataset | ImageFolder, cfg: SweepConfig) -> Dataset:
    """The seeded evaluation subset of ``test`` (decoded, for an image folder), checked to fit
    every model: channels, size and class count.

    Raises:
        DataError: images that do not fit a model.
    """
    probe = fit_probe(test, cfg.eval_subset)  # a misfit costs no decoding
    for m in models:
        check_input_fits(m.model, probe, channels=m.meta.get("arch_kwargs", {}).get("in_channels"), who=m.label)
    return test.subset(cfg.eval_subset, seed=SUBSET_SEED)


def fit_probe(test: Dataset | ImageFolder, n: int | None) -> Dataset:
    """What :func:`~robustse.training.predict.check_input_fits` needs of ``test`` before its seeded
    selection of ``n`` is decoded: an image folder's first two images of that selection (and its
    classes), or the in-memory set itself."""
    if isinstance(test, ImageFolder):
        return test.decode(test.selection(n, seed=SUBSET_SEED)[:2])
    return test


def fit_temperatures(
    models: list[SweepModel],
    held_out: Dataset | None,
    *,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> None:
    """Fit each model's calibration temperature on ``held_out`` test examples (not in the
    evaluation set, never trained on); without any, calibrated measures are not recorded."""
    if held_out is None:
        if log:
            log("the evaluation set is the whole test split: no held-out examples to calibrate logits on")
        return
    for m in models:
        m.temperature = fit_temperature(logits_of(m.model, held_out, device=device), held_out.y)


def intervention_models(models: list[SweepModel], which: Sequence[str] = INTERVENTIONS) -> list[SweepModel]:
    """The gate interventions of every SE model, as sweep models attacked white-box (README "Metrics").

    ``held_gates``: every gate held at its clean value s(x) while the adversary perturbs x;
    ``frozen_mean``: gates fixed to the training-set means (models that have them). Each shares its
    model's weights and is labelled ``<label>@<intervention>``.
    """
    out = []
    for m in models:
        if not find_gates(m.model):
            continue
        if "held_gates" in which:
            out.append(_intervention(m, "held_gates", functools.partial(held_gates, m.model)))
        if "frozen_mean" in which and m.gate_means is not None:
            out.append(_intervention(m, "frozen_mean", functools.partial(_frozen_gates, m.model, m.gate_means)))
    return out


def _frozen_gates(model: torch.nn.Module, means: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
    """The frozen_mean intervention for a batch ``x``: the same means whatever the batch."""
    return fixed_gates(model, means)


def _intervention(m: SweepModel, what: str, hold: Any) -> SweepModel:
    """``m`` under a gate intervention: its weights, no transfer interventions of its own."""
    meta = {k: v for k, v in m.meta.items() if k != "gate_means"} | {"intervention": what}
    label = intervention_label(m.label, what)
    return SweepModel(label, m.model, m.checkpoint, meta, hold=hold, temperature=m.temperature)
