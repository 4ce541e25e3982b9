"""Sweeps: models × attacks × epsilons over one evaluation set, into a resumable results store.

For every model the clean pass runs once and is reused by every cell. Cells run rung by rung (eps
ascending) and each is committed with its per-example rows in one transaction; the clean-input
gradient of attacks without a random start is cached per batch, so FGSM's whole ladder still costs
one backward pass per batch. A rerun skips finished cells; a killed sweep loses at most the cell
in flight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from .attacks import Attack, Evaluator, create_attack
from .checkpoint import weight_hash
from .checks import Check, run_checks
from .data import Dataset, to_float
from .distributed import SINGLE, Dist
from .drift import CellProbe, snapshot_bytes
from .errors import DataError, SpecError
from .metrics import margin
from .probes import find_gates
from .stats import CONTROLS, wilson_interval
from .store import PROBE_COLUMNS, Cell, ResultsStore, attack_key

# Perturbations that are measured but are not attacks on the label: they never count toward
# robust accuracy (the noise control; the gate attack, which only SE models can run).
CONTROL_ATTACKS = CONTROLS


@dataclass
class SweepModel:
    """A model taking part in a sweep."""

    label: str
    model: nn.Module
    checkpoint: str
    meta: dict[str, Any] = field(default_factory=dict)
    gate_means: dict[str, torch.Tensor] | None = None  # frozen_mean values; default: meta["gate_means"]

    def __post_init__(self) -> None:
        if self.gate_means is None and isinstance(self.meta.get("gate_means"), dict):
            self.gate_means = {k: torch.tensor(v, dtype=torch.float32) for k, v in self.meta["gate_means"].items()}


@dataclass
class SweepResult:
    """What :func:`run_sweep` produced: per-cell robust accuracy, worst case, checks."""

    out_dir: Path
    cells: Any  # pandas DataFrame of the cells table (None on ranks other than 0)
    robust: Any  # DataFrame: model, eps, n, correct, accuracy, ci_low, ci_high (worst case over attacks)
    checks: list[Check]
    computed_cells: int = 0


def evalset_fingerprint(ds: Dataset) -> str:
    """SHA-256 of an evaluation set's name, split, images and labels."""
    import hashlib

    h = hashlib.sha256(f"{ds.name}|{ds.split}|{tuple(ds.x.shape)}|".encode())
    h.update(ds.x.contiguous().numpy().tobytes())
    h.update(ds.y.contiguous().numpy().tobytes())
    return h.hexdigest()


def build_attacks(specs: Sequence[dict[str, Any]], *, norm: str, seed: int, noise: bool = True) -> list[Attack]:
    """Attacks from spec tables ``{name = "pgd", steps = 10, ...}``; norm and seed default from the sweep.

    With ``noise`` every norm among the attacks gets its random-noise control (same eps ladder)
    unless the spec lists one.
    """
    attacks = []
    for spec in specs:
        spec = dict(spec)
        name = spec.pop("name", None)
        if not isinstance(name, str):
            raise SpecError(f"every attack needs a name (got {spec!r})")
        if not name.startswith("torchattacks:"):  # torchattacks attacks carry their own norm
            spec.setdefault("norm", norm)
        spec.setdefault("seed", seed)
        attacks.append(create_attack(name, **spec))
    if noise:
        have = {a.norm for a in attacks if a.name == "noise"}
        for n in dict.fromkeys(a.norm for a in attacks if a.name != "noise"):
            if n not in have:
                attacks.append(create_attack("noise", norm=n, seed=seed))
    keys = [attack_key(a.describe()) for a in attacks]
    if len(set(keys)) != len(keys):
        raise SpecError("the same attack with the same options is listed twice")
    return attacks


class _Clean(NamedTuple):
    """A model's clean pass over the evaluation set (CPU tensors, one entry per example)."""

    pred: torch.Tensor
    margin: torch.Tensor
    finite: torch.Tensor  # logits all finite


def _clean_pass(ev: Evaluator, x: torch.Tensor, y: torch.Tensor, bs: int, device, layout: Dist):  # type: ignore[no-untyped-def]
    """Clean predictions and margins, the zero-gradient fraction and a probabilities test.

    Predictions come from the same evaluator as the adversarial ones (eps = 0 matches exactly); the
    input gradient for the zero-gradient check comes from the same pass. Batches are sharded
    over ranks and the results gathered (every rank gets all of them).
    """
    n = len(y)
    preds = torch.zeros(n, dtype=torch.long)
    margs = torch.zeros(n)
    finite = torch.zeros(n, dtype=torch.bool)
    zero_grads, prob_like = 0, True
    for b, i in enumerate(range(0, n, bs)):
        if not layout.owns(b):
            continue
        xb, yb = to_float(x[i : i + bs].to(device, non_blocking=True)), y[i : i + bs].to(device, non_blocking=True)
        logits, grad = ev.logits_and_grad(xb, yb)
        zero_grads += int((grad.flatten(1).abs().amax(1) == 0).sum())
        rows_sum_one = torch.allclose(logits.sum(1), torch.ones(len(logits), device=device), atol=1e-3)
        prob_like &= bool(rows_sum_one and logits.min() >= 0 and logits.max() <= 1)
        preds[i : i + bs] = logits.argmax(1).cpu()
        margs[i : i + bs] = margin(logits, yb).cpu()
        finite[i : i + bs] = torch.isfinite(logits).all(1).cpu()
    if layout.active:
        parts = layout.gather((preds, margs, finite, zero_grads, prob_like))
        _merge_rows((preds, margs, finite), parts, bs, layout.world)
        zero_grads = sum(p[3] for p in parts)
        prob_like = all(p[4] for p in parts)
    return _Clean(preds, margs, finite), zero_grads / n, prob_like


def _merge_rows(dst: Sequence[torch.Tensor], parts: list[Any], bs: int, world: int) -> None:
    """Fill ``dst`` batch by batch from the gathered ``parts`` of the rank that computed each batch
    (batch b runs on rank b mod world; each part starts with its copies of ``dst``)."""
    for b, i in enumerate(range(0, len(dst[0]), bs)):
        for d, src in zip(dst, parts[b % world], strict=False):
            d[i : i + bs] = src[i : i + bs]


def run_sweep(
    models: Sequence[SweepModel],
    attacks: Sequence[Attack],
    epsilons: Sequence[float],
    dataset: Dataset,
    out_dir: Path,
    *,
    batch_size: int = 256,
    accuracy_only: bool = False,
    probes: bool = True,
    probe_subsample: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    layout: Dist = SINGLE,
    debug: Callable[[str], None] | None = None,
    channels_last: bool = False,
) -> SweepResult:
    """Run every (model, attack, eps) cell not yet in ``out_dir/results.db``; then check and summarize.

    Args:
        models: the models (distinct labels).
        attacks: the attacks (their ``describe()`` tells cells apart).
        epsilons: the eps ladder, shared by all attacks (pixel units of each attack's norm).
        dataset: the evaluation set (uint8 images); example ``idx`` is the row in it.
        out_dir: run directory (``results.db``, ``results.csv``).
        batch_size: examples per attack call.
        accuracy_only: larger eps attack only the examples that survived smaller ones (no probes).
        probes: record output sensitivity, gate and block drift, the gate interventions (SE
            models), per-class excitations and a few adversarial images for every cell.
        probe_subsample: leading examples whose per-gate/block values are kept (for bootstrap).
        device: where to run.
        progress: progress bar with ETA over batches of all cells.
        log: receives one line per finished ladder.
        debug: receives the plan and one line per finished cell (``--verbose``).
        layout: the torchrun layout (:mod:`robustse.distributed`): batches are sharded over
            ranks, results gathered, and only rank 0 touches the store. Every rank must call
            this with the same arguments.
        channels_last: attack the models in channels_last memory layout (weights converted for
            the sweep, restored afterwards). The same function up to float rounding: measured on
            the project's 2-core CPU, PGD 1.15-1.25x faster; adversarials then equal torchattacks'
            on the channels_last model, and differ from the default layout's in a few pixels.
            Part of the store's identity: a store holds one layout's results.

    Returns:
        :class:`SweepResult` (on ranks other than 0: no tables, ``cells`` and ``robust`` None).

    Example:
        >>> run_sweep([SweepModel("m", model, "m.safetensors")], [create_attack("fgsm")],
        ...           [0, 0.03], ds, Path("reports/sweep"))  # doctest: +SKIP
    """
    device = torch.device(device)
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise SpecError(f"model labels must be distinct (got {labels})")
    eps = sorted({float(e) for e in epsilons})
    if len(dataset) == 0:
        raise DataError(f"{dataset.name}: the evaluation set is empty")
    ladders = {id(a): _ladder_of(a, eps) for a in attacks}
    hashes = {sm.label: weight_hash(sm.model.state_dict()) for sm in models}
    store: ResultsStore | None = None
    if layout.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        store = ResultsStore(out_dir / "results.db")
    computed = 0
    # the gate attack runs on models with gates only
    pairs = [(sm, atk) for sm in models for atk in attacks if atk.name != "gate" or find_gates(sm.model)]
    restore = _to_channels_last(models) if channels_last else []
    try:
        todo_lists: list[list[float]] | None = None
        if store is not None:
            store.check_identity(
                "memory_format", "channels_last" if channels_last else "contiguous", "memory layout (--channels-last)"
            )
            todo_lists = _prepare_store(store, models, pairs, ladders, hashes, dataset, accuracy_only, log)
        todo_lists = layout.broadcast(todo_lists)
        assert todo_lists is not None
        # the data lives on the device once (uint8), batches are sliced there: no host copies per batch
        x_all, y_all = dataset.x.to(device), dataset.y.to(device)
        n = len(y_all)
        n_batches = (n + batch_size - 1) // batch_size
        probes = probes and not accuracy_only
        plan = list(zip(pairs, todo_lists, strict=True))
        total = sum(n_batches * len(todo) for _, todo in plan)
        if debug and layout.is_main:
            debug(f"cells to run: {sum(len(todo) for _, todo in plan)} ({n} examples, batch {batch_size})")
        bar = tqdm(
            total=total, desc="sweep", unit="batch", disable=None if progress and layout.is_main else True,
            dynamic_ncols=True,
        )  # fmt: skip
        clean_cache: dict[str, _Clean] = {}
        clean_snaps: dict[str, _SnapCache] = {}  # recorded clean passes for probes, per model and batch
        counters: dict[str, list[int]] = {}
        evaluators: dict[str, Evaluator] = {}
        for (sm, atk), todo in plan:
            for done in [k for k in evaluators if k != sm.label]:  # models run one after another:
                del evaluators[done]  # free the last one's prediction copy (GPU memory)
            sm.model.to(device).eval()
            train_forwards = counters.setdefault(sm.label, [0])
            hook = sm.model.register_forward_pre_hook(
                lambda mod, inp, c=train_forwards: c.__setitem__(0, c[0] + int(any(m.training for m in mod.modules())))
            )
            try:
                if sm.label not in evaluators:
                    evaluators[sm.label] = Evaluator(sm.model)
                if sm.label not in clean_cache:
                    clean, zero_frac, prob_like = _clean_pass(
                        evaluators[sm.label], x_all, y_all, batch_size, device, layout
                    )
                    clean_cache[sm.label] = clean
                    if store is not None:
                        store.write_model(
                            sm.label,
                            weight_hash=hashes[sm.label],
                            checkpoint=sm.checkpoint,
                            arch=sm.meta.get("arch"),
                            n=n,
                            clean_correct=int((clean.pred == y_all.cpu()).sum()),
                            zero_grad_fraction=zero_frac,
                            probability_like=int(prob_like),
                            train_mode_forwards=train_forwards[0],
                        )
                if not todo:
                    continue
                computed += _run_cells(
                    store, sm, evaluators[sm.label], atk, ladders[id(atk)], todo, x_all, y_all, clean_cache[sm.label],
                    batch_size, accuracy_only, device, bar, (probe_subsample if probes else None), layout,
                    clean_snaps, debug,
                )  # fmt: skip
                forwards = int(layout.all_sum(train_forwards[0]))
                if store is not None:
                    store.update_model(sm.label, train_mode_forwards=forwards)
                if log and layout.is_main:
                    log(f"{sm.label} × {atk.name}: {len(todo)} eps done")
            finally:
                hook.remove()
        bar.close()
        if store is None:
            return SweepResult(out_dir, None, None, [], computed)
        num_classes = len(dataset.classes)
        keys = [attack_key(a.describe()) for a in attacks]
        examples = store.examples()  # read once: checks, exports and the worst case share it
        checks = run_checks(store, num_classes=num_classes, models=labels, attack_keys=keys, examples=examples)
        store.write_checks((c.model, c.name, c.status, c.detail) for c in checks)
        store.export_csv(out_dir / "results.csv", examples)
        store.export_parquet(out_dir / "results.parquet", examples)  # when pyarrow is installed
        cells = store.cells()
        cells = cells[cells.model.isin(labels) & cells.attack_key.isin(keys) & cells.eps.isin(eps)]
        robust = worst_case_accuracy(store, models=labels, attack_keys=keys, epsilons=eps, examples=examples)
    finally:
        _restore_strides(restore)
        if store is not None:
            store.close()
    return SweepResult(out_dir, cells, robust, checks, computed)


def _to_channels_last(models: Sequence[SweepModel]) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """Convert the models' 4-d parameters and buffers to channels_last; (tensor, original strides).

    Converts as ``Module.to(memory_format=torch.channels_last)`` does, ambiguous shapes included
    (a (16, 1, 5, 5) weight counts as contiguous in both layouts, yet its strides steer the kernels).
    """
    converted = []
    for sm in models:
        for t in [*sm.model.parameters(), *sm.model.buffers()]:
            if t.dim() == 4:
                converted.append((t, t.stride()))
                t.data = t.data.to(memory_format=torch.channels_last)
    return converted


def _restore_strides(converted: list[tuple[torch.Tensor, tuple[int, ...]]]) -> None:
    """Put converted tensors back in their own strides, on whatever device the sweep left them."""
    for t, stride in converted:
        t.data = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t.data)


def _prepare_store(store, models, pairs, ladders, hashes, dataset, accuracy_only, log) -> list[list[float]]:  # type: ignore[no-untyped-def]
    """Check the store is this sweep's, drop stale and failed cells; the eps still to run per (model, attack) pair."""
    # The same store must mean the same evaluation set and mode: never mix results.
    store.check_identity("evalset", evalset_fingerprint(dataset), "evaluation set (dataset or --eval-subset)")
    store.check_identity("accuracy_only", str(bool(accuracy_only)), "mode (--accuracy-only)")
    store.set_meta("classes", json.dumps(list(dataset.classes)))
    store.set_meta("dataset", dataset.name)
    for sm in models:
        old = store.model_hash(sm.label)
        if old is not None and old != hashes[sm.label]:  # retrained under the same name
            dropped = store.delete_cells(sm.label)
            if log:
                log(f"{sm.label}: weights changed since the stored results; recomputing {dropped} cell(s)")
    for model_label, key, e in store.failed_cells():  # failed cells are retried
        store.delete_cells(model_label, attack_key=key, eps=e)
    return [
        [e for e in ladders[id(atk)] if not store.has_cell(sm.label, attack_key(atk.describe()), e)]
        for sm, atk in pairs
    ]


class _SnapCache(dict):  # type: ignore[type-arg]
    """Recorded clean passes of one model by batch, within a memory budget (bytes left)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget


def _probe_cache_bytes() -> int:
    """Memory for reusing recorded clean passes across cells: $ROBUSTSE_PROBE_CACHE_MB (512)."""
    import os

    try:
        return max(0, int(os.environ.get("ROBUSTSE_PROBE_CACHE_MB", "512"))) * 2**20
    except ValueError:
        return 512 * 2**20


def _ladder_of(atk: Attack, eps: list[float]) -> list[float]:
    """The rungs ``atk`` runs: the sweep's ladder, or its ``only_eps`` (with 0) where set.

    Raises:
        SpecError: an ``only_eps`` value that is not on the sweep's ladder.
    """
    if atk.only_eps is None:
        return eps
    missing = sorted(set(atk.only_eps) - set(eps))
    if missing:
        raise SpecError(f"{atk.name}: only_eps {missing[0]} is not on the sweep's eps ladder")
    return [e for e in eps if e == 0 or e in atk.only_eps]


def _run_cells(  # type: ignore[no-untyped-def]
    store, sm, ev, atk, eps, todo, x_all, y_all, clean, bs, accuracy_only, device, bar, subsample,
    layout, clean_snaps, debug=None,
):  # fmt: skip
    """Compute the cells ``todo`` of one (model, attack) pair, rung by rung, each its own transaction.

    The clean-input gradient of attacks without a random start is computed once per batch and
    reused by every rung (FGSM's whole ladder costs one backward pass per batch). In accuracy-only
    mode a rung attacks only the examples that survived the rung below it; the others keep their
    earlier adversarial, which lies inside every larger ball. With ``subsample`` (not None) every
    batch is also probed (:class:`~robustse.drift.CellProbe`). Under torchrun each rank runs its
    batches; the rung's results are gathered on every rank and rank 0 (``store``) writes them.
    """
    key = attack_key(atk.describe())
    clean_pred, clean_margin = clean.pred, clean.margin
    n = len(y_all)
    y_cpu = y_all.cpu()
    grads: dict[int, torch.Tensor | None] = {}
    frozen_clean: dict[int, torch.Tensor | None] = {}
    for other in [k for k in clean_snaps if k != sm.label]:  # models run one after another: free the last one's
        del clean_snaps[other]
    snaps = clean_snaps.setdefault(sm.label, _SnapCache(_probe_cache_bytes()))
    prev_correct, prev_pred, prev_margin = clean_pred == y_cpu, clean_pred.clone(), clean_margin.clone()
    for rung, e in enumerate(eps):
        if e not in todo:
            if accuracy_only:  # a finished rung (resumed run): its survivors seed the next one
                rows = layout.broadcast(store.cell_rows(sm.label, key, e) if store is not None else None)
                prev_correct = torch.tensor([bool(r[0]) for r in rows])
                prev_pred = torch.tensor([r[1] for r in rows])
                prev_margin = torch.tensor([r[2] for r in rows], dtype=clean_margin.dtype)
            continue
        t0 = time.perf_counter()
        pred, adv_margin = prev_pred.clone(), prev_margin.clone()
        stats = {"linf": 0.0, "l2": 0.0, "min": 1.0, "max": 0.0, "nonfinite": 0}
        probe = None if subsample is None else CellProbe(n, subsample=subsample, gate_means=sm.gate_means)
        for b, i in enumerate(range(0, n, bs)):
            if not layout.owns(b):
                continue
            xb, yb = to_float(x_all[i : i + bs]), y_all[i : i + bs]
            if b not in grads:
                grads[b] = atk.clean_gradient(sm.model, xb, yb)
            rows = torch.arange(len(yb))
            if accuracy_only:
                rows = prev_correct[i : i + bs].nonzero().flatten()
            if len(rows):
                g = grads[b]
                sub = rows.to(device)
                res = atk(
                    sm.model,
                    xb[sub],
                    yb[sub],
                    epsilons=[e],
                    accuracy_only=accuracy_only,
                    grad0=None if g is None else g[sub],
                    stream=b * 1009 + rung,
                )
                adv = res.adversarials[0]
                if e == 0 and torch.equal(adv, xb[sub]):  # the clean input itself: its clean pass stands
                    finite = clean.finite[i + rows]
                    pred[i + rows], adv_margin[i + rows] = clean_pred[i + rows], clean_margin[i + rows]
                else:
                    logits = ev(adv)
                    finite = (torch.isfinite(logits).all(1) & torch.isfinite(adv).flatten(1).all(1)).cpu()
                    pred[i + rows] = logits.argmax(1).cpu()
                    adv_margin[i + rows] = margin(logits, yb[sub]).cpu()
                stats["nonfinite"] += int((~finite).sum())
                delta = (adv - xb[sub]).flatten(1)
                stats["linf"] = max(stats["linf"], float(delta.abs().max()))
                stats["l2"] = max(stats["l2"], float(delta.norm(dim=1).max()))
                lo, hi = adv.aminmax()
                stats["min"], stats["max"] = min(stats["min"], float(lo)), max(stats["max"], float(hi))
                if probe is not None:  # every row was attacked (no accuracy-only): adv is the batch
                    frozen_clean[b], snap = probe.add(
                        sm.model, xb, adv, yb, i, frozen_clean=frozen_clean.get(b), clean=snaps.get(b)
                    )
                    if b not in snaps and snaps.budget >= snapshot_bytes(snap):  # reuse the clean pass
                        snaps[b] = snap
                        snaps.budget -= snapshot_bytes(snap)
            bar.update(layout.world if layout.is_main else 1)
        if layout.active:  # every rank gets every batch's results, in batch order
            parts = layout.gather((pred, adv_margin, stats, probe))
            _merge_rows((pred, adv_margin), parts, bs, layout.world)
            stats = {
                "linf": max(p[2]["linf"] for p in parts), "l2": max(p[2]["l2"] for p in parts),
                "min": min(p[2]["min"] for p in parts), "max": max(p[2]["max"] for p in parts),
                "nonfinite": sum(p[2]["nonfinite"] for p in parts),
            }  # fmt: skip
            if probe is not None:
                probe = CellProbe.merge([p[3] for p in parts])
        correct = pred == y_cpu
        prev_correct, prev_pred, prev_margin = correct, pred, adv_margin
        if store is None:
            continue
        ok = stats["nonfinite"] == 0
        cell = Cell(
            sm.label,
            atk.name,
            key,
            atk.norm,
            e,
            n,
            int(correct.sum()),
            time.perf_counter() - t0,
            "done" if ok else "failed",
            None if ok else f"{stats['nonfinite']} non-finite rows",
            stats["linf"],
            stats["l2"],
            stats["min"],
            stats["max"],
            stats["nonfinite"],
        )
        columns = [
            range(n),
            y_cpu.tolist(),
            clean_pred.tolist(),
            pred.tolist(),
            correct.int().tolist(),
            torch.nan_to_num(clean_margin).tolist(),
            torch.nan_to_num(adv_margin).tolist(),
        ]
        tables = None
        if probe is not None:
            measured = probe.example_columns()
            columns += [measured.get(c, [None] * n) for c in PROBE_COLUMNS]
            tables = {
                "sites": probe.site_rows(),
                "site_examples": probe.subsample_rows(),
                "excitations": probe.excitation_rows(),
                "gallery": probe.gallery_rows(),
            }
        store.write_cell(cell, zip(*columns, strict=True), tables)
        if debug:
            acc = cell.correct / n
            debug(f"  {sm.label} {atk.name} eps={e:g}: accuracy {acc:.4f} ({cell.seconds:.1f}s, {cell.status})")
    return len(todo)


def worst_case_accuracy(store: ResultsStore, *, models=None, attack_keys=None, epsilons=None, examples=None):  # type: ignore[no-untyped-def]
    """Robust accuracy per model and eps: an example counts as robust only if no attack fooled it.

    The random-noise control and the gate attack (``CONTROL_ATTACKS``) are left out of the worst case. ``models``,
    ``attack_keys`` and ``epsilons`` restrict it to one sweep's cells (a store may hold more).
    ``examples``: the store's examples table if the caller has already read it.
    """
    import pandas as pd

    ex = store.examples() if examples is None else examples
    ex = ex[~ex.attack.isin(CONTROL_ATTACKS)]
    if models is not None:
        ex = ex[ex.model.isin(list(models))]
    if attack_keys is not None:
        ex = ex[ex.attack_key.isin(list(attack_keys))]
    if epsilons is not None:
        ex = ex[ex.eps.isin(list(epsilons))]
    if ex.empty:
        return pd.DataFrame(columns=["model", "norm", "eps", "n", "correct", "accuracy", "ci_low", "ci_high"])
    per = ex.groupby(["model", "norm", "eps", "idx"]).correct.min().reset_index()
    agg = per.groupby(["model", "norm", "eps"]).correct.agg(["size", "sum"]).reset_index()
    agg.columns = ["model", "norm", "eps", "n", "correct"]
    agg["accuracy"] = agg.correct / agg.n
    cis = [wilson_interval(int(c), int(k)) for c, k in zip(agg.correct, agg.n, strict=True)]
    agg["ci_low"], agg["ci_high"] = [c[0] for c in cis], [c[1] for c in cis]
    return agg
