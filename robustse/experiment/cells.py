"""One (model, attack) ladder of a sweep, rung by rung and batch by batch: attack, predict, probe,
and write each finished cell with its per-example rows in one transaction (:class:`CellSteps`),
with the small types a sweep passes around."""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from robustse.attacks import Attack
from robustse.attacks.evaluator import Evaluator
from robustse.core.distributed import Dist
from robustse.core.passes import rows_of_pass
from robustse.core.store import PROBE_COLUMNS, Cell, ResultsStore, attack_key
from robustse.data.base import to_float
from robustse.experiment.checks import Check
from robustse.probes.cell import CellProbe, snapshot_bytes
from robustse.probes.metrics import margin


@dataclass
class SweepModel:
    """A model taking part in a sweep."""

    label: str
    model: nn.Module
    checkpoint: str
    meta: dict[str, Any] = field(default_factory=dict)
    gate_means: dict[str, torch.Tensor] | None = None  # frozen_mean values; default: meta["gate_means"]
    # a gate intervention attacked white-box (README "Metrics"): entered around every batch ``x``
    # (clean pass, attack, predictions, probes); None for the model as it is
    hold: Callable[[torch.Tensor], contextlib.AbstractContextManager[None]] | None = None
    # logits divided by this give calibrated measures (fitted on held-out examples); None: not fitted
    temperature: float | None = None

    def __post_init__(self) -> None:
        if self.gate_means is None and isinstance(self.meta.get("gate_means"), dict):
            self.gate_means = {k: torch.tensor(v, dtype=torch.float32) for k, v in self.meta["gate_means"].items()}

    def batch(self, x: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """The context every pass over the clean batch ``x`` (or its perturbations) runs in."""
        return contextlib.nullcontext() if self.hold is None else self.hold(x)

    def evaluator(self) -> Evaluator:
        """The prediction path: a channels_last copy, or the model itself for an intervention (its
        gates are set per batch on the model)."""
        return Evaluator(self.model) if self.hold is None else Evaluator(self.model, copy_model=False)


@dataclass
class SweepResult:
    """What :func:`run_sweep` produced: per-cell robust accuracy, worst case, checks."""

    out_dir: Path
    cells: Any  # pandas DataFrame of the cells table (None on ranks other than 0)
    robust: Any  # DataFrame: model, eps, n, correct, accuracy, ci_low, ci_high (worst case over attacks)
    checks: list[Check]
    computed_cells: int = 0


class Clean(NamedTuple):
    """A model's clean pass over the evaluation set (CPU tensors, one entry per example)."""

    pred: torch.Tensor
    margin: torch.Tensor
    finite: torch.Tensor  # logits all finite


@dataclass
class PerturbationStats:
    """A cell's adversarials at a glance: largest Linf and L2 perturbation, pixel range, and the
    number of rows whose adversarial or logits are not finite. Accumulated batch by batch
    (:meth:`update`) and, under torchrun, over ranks (:meth:`merge`)."""

    linf: float = 0.0
    l2: float = 0.0
    min: float = 1.0
    max: float = 0.0
    nonfinite: int = 0

    def update(self, delta: torch.Tensor, adv: torch.Tensor, finite: torch.Tensor) -> None:
        """Add one batch: ``delta`` (B, D) perturbations, ``adv`` adversarials, ``finite`` (B,) bools."""
        self.nonfinite += int((~finite).sum())
        self.linf = max(self.linf, float(delta.abs().max()))
        self.l2 = max(self.l2, float(delta.norm(dim=1).max()))
        lo, hi = adv.aminmax()
        self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))

    @classmethod
    def merge(cls, parts: Sequence[PerturbationStats]) -> PerturbationStats:
        """One summary from those of several ranks."""
        return cls(
            linf=max(p.linf for p in parts), l2=max(p.l2 for p in parts),
            min=min(p.min for p in parts), max=max(p.max for p in parts),
            nonfinite=sum(p.nonfinite for p in parts),
        )  # fmt: skip


@dataclass
class SweepOptions:
    """How a sweep runs (the keyword options of :func:`run_sweep`)."""

    batch_size: int = 256
    accuracy_only: bool = False
    probes: bool = True
    probe_subsample: int = 256
    channels_last: bool = False
    progress: bool = True
    seed_batching: bool | None = None  # attack the seeds of one architecture at once; None: on a GPU
    pass_rows: int | None = None  # rows per gradient and probe pass within a batch (None: the pass budget's)
    compile: str = "auto"  # attack passes through torch.compile: auto, on, off (robustse.attacks.compiled)


@dataclass
class Rung:
    """The state a ladder carries from one rung to the next: per example, was it still classified
    correctly, its prediction and its margin (accuracy-only mode attacks the survivors only)."""

    correct: torch.Tensor
    pred: torch.Tensor
    margin: torch.Tensor


@dataclass
class Ladder:
    """One model × attack ladder in progress: its rungs, what is left to run and its caches."""

    sm: SweepModel
    atk: Attack
    key: str
    eps: list[float]  # the attack's rungs (ascending)
    todo: list[float]
    ev: Evaluator
    clean: Clean
    snaps: SnapCache  # recorded clean passes of this model, shared by its ladders
    grads: dict[int, torch.Tensor | None] = field(default_factory=dict)  # clean-input gradient per batch
    frozen_clean: dict[tuple[int, int], torch.Tensor | None] = field(default_factory=dict)  # frozen_mean clean logits


class SnapCache(dict):
    """Recorded clean passes of one model by batch, within a memory budget (bytes left)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget


@dataclass
class Opened:
    """A model being attacked (:meth:`robustse.experiment.sweep.Sweep._open`): evaluator, clean pass, probe cache, the
    training-mode forward counter and its hook."""

    sm: SweepModel
    ev: Evaluator
    clean: Clean
    snaps: SnapCache
    train_forwards: list[int]
    hook: Any

    def ladder(self, ladders: dict[int, list[float]], atk: Attack, todo: list[float]) -> Ladder:
        """The ladder of ``atk`` on this model (its rungs: ``ladders[id(atk)]``) with ``todo`` left."""
        key = attack_key(atk.describe())
        return Ladder(self.sm, atk, key, ladders[id(atk)], todo, self.ev, self.clean, self.snaps)


def cell_stream(batch: int, eps: float) -> int:
    """The random stream of one batch of a cell: a function of the batch number and the eps alone,
    so a cell draws the same random starts whatever else the ladder holds or ran before it (with
    the attack's seed: the same for every model, common random numbers for paired comparisons)."""
    return zlib.crc32(f"{batch}|{float(eps).hex()}".encode()) & 0x7FFFFFFF


class CellSteps:
    """The steps of one ladder (:meth:`run_ladder` → :meth:`run_rung` per eps → :meth:`attack_batch`
    per batch → :meth:`write_cell`), for :class:`robustse.experiment.sweep.Sweep`."""

    # The sweep's state these steps use (set by robustse.experiment.sweep.Sweep).
    opt: SweepOptions
    device: torch.device
    layout: Dist
    store: ResultsStore | None
    stale: set[str]
    probes: bool
    pass_rows: int | None
    bar: Any
    x_all: torch.Tensor
    y_all: torch.Tensor
    computed: int
    debug: Callable[[str], None] | None

    def run_ladder(self, lad: Ladder) -> None:
        """The cells ``lad.todo`` of one (model, attack) pair, rung by rung, each its own transaction.

        The clean-input gradient of attacks without a random start is computed once per batch and
        reused by every rung (FGSM's whole ladder costs one backward pass per batch). In
        accuracy-only mode a rung attacks only the examples that survived the rung below it; the
        others keep their earlier adversarial, which lies inside every larger ball. Under torchrun
        each rank runs its batches; the rung's results are gathered on every rank and rank 0
        writes them.
        """
        y_cpu = self.y_all.cpu()
        prev = Rung(lad.clean.pred == y_cpu, lad.clean.pred.clone(), lad.clean.margin.clone())
        for rung, e in enumerate(lad.eps):
            if e in lad.todo and not self._done_elsewhere(lad, e):
                prev = self.run_rung(lad, rung, e, prev)
                self.computed += 1
            elif self.opt.accuracy_only:  # a finished rung (resumed run): its survivors seed the next one
                prev = self._stored_rung(lad, e)

    def _done_elsewhere(self, lad: Ladder, e: float) -> bool:
        """Whether another process sweeping into the same store has finished this cell since the
        plan was made (two sweeps into one run directory share the work instead of colliding)."""
        done = None
        if self.store is not None:
            done = lad.sm.label not in self.stale and self.store.has_cell(lad.sm.label, lad.key, e)
        return bool(self.layout.broadcast(done))

    def _stored_rung(self, lad: Ladder, e: float) -> Rung:
        rows = self.layout.broadcast(self.store.cell_rows(lad.sm.label, lad.key, e) if self.store is not None else None)
        return Rung(
            torch.tensor([bool(r[0]) for r in rows]),
            torch.tensor([r[1] for r in rows]),
            torch.tensor([r[2] for r in rows], dtype=lad.clean.margin.dtype),
        )

    def run_rung(self, lad: Ladder, rung: int, e: float, prev: Rung) -> Rung:
        """Attack every batch (this rank's) at eps ``e``, gather, and write the cell (rank 0)."""
        t0 = time.perf_counter()
        pred, adv_margin = prev.pred.clone(), prev.margin.clone()
        stats = PerturbationStats()
        n = len(self.y_all)
        probe = self._probe(lad) if self.probes else None
        for b, i in enumerate(range(0, n, self.opt.batch_size)):
            if self.layout.owns(b):
                self.attack_batch(lad, (b, i, rung, e), prev.correct, (pred, adv_margin), stats, probe)
            self.bar.update(self.layout.world if self.layout.is_main else 1)
        if self.layout.active:  # every rank gets every batch's results, in batch order
            parts = self.layout.gather((pred, adv_margin, stats, probe))
            merge_rows((pred, adv_margin), parts, self.opt.batch_size, self.layout.world)
            stats = PerturbationStats.merge([p[2] for p in parts])
            probe = CellProbe.merge([p[3] for p in parts]) if probe is not None else None
        correct = pred == self.y_all.cpu()
        if self.store is not None:
            self.write_cell(lad, e, (pred, adv_margin, correct), stats, probe, time.perf_counter() - t0)
        return Rung(correct, pred, adv_margin)

    def _probe(self, lad: Ladder) -> CellProbe:
        """A cell's probe: the intact model's also scores the gate interventions on its adversarials."""
        sm, n = lad.sm, len(self.y_all)
        return CellProbe(
            n, subsample=self.opt.probe_subsample, gate_means=sm.gate_means, transfer=sm.hold is None,
            temperature=sm.temperature,
        )  # fmt: skip

    def attack_batch(self, lad, where, prev_correct, out, stats, probe) -> None:
        """Attack one batch; fill its rows of ``out`` = (pred, margin); update ``stats`` and ``probe``.

        ``where`` = (batch number, first row, rung, eps): the random stream of the attack is the
        batch's at that eps (:func:`cell_stream`).
        """
        b, i, rung, e = where
        bs = self.opt.batch_size
        xb = to_float(self.x_all[i : i + bs])
        with lad.sm.batch(xb):
            self._attack_rows(lad, where, prev_correct, out, stats, probe)

    def _attack_rows(self, lad, where, prev_correct, out, stats, probe) -> None:
        b, i, rung, e = where
        bs = self.opt.batch_size
        xb, yb = to_float(self.x_all[i : i + bs]), self.y_all[i : i + bs]
        if b not in lad.grads:
            lad.grads[b] = lad.atk.clean_gradient(lad.sm.model, xb, yb)
        rows = prev_correct[i : i + bs].nonzero().flatten() if self.opt.accuracy_only else torch.arange(len(yb))
        if not len(rows):
            return
        sub = rows.to(self.device)
        g = lad.grads[b]
        res = lad.atk(
            lad.sm.model, xb[sub], yb[sub], epsilons=[e], accuracy_only=self.opt.accuracy_only,
            grad0=None if g is None else g[sub], stream=cell_stream(b, e),
        )  # fmt: skip
        self._score_rows(lad, where, (rows, res.adversarials[0]), out, (stats, probe))

    def _score_rows(self, lad, where, attacked, out, tallies) -> None:
        """Predict the adversarials ``attacked`` = (rows, adv) of one batch; fill ``out`` =
        (pred, margin) at those rows; update ``tallies`` = (stats, probe)."""
        (b, i, _, e), (rows, adv), (stats, probe) = where, attacked, tallies
        bs = self.opt.batch_size
        xb, yb = to_float(self.x_all[i : i + bs]), self.y_all[i : i + bs]
        sub, idx = rows.to(self.device), i + rows
        if e == 0 and torch.equal(adv, xb[sub]):  # the clean input itself: its clean pass stands
            finite = _fill_rows(out, idx, lad.clean.pred[idx], lad.clean.margin[idx], lad.clean.finite[idx])
        else:
            logits = lad.ev(adv)
            finite = (torch.isfinite(logits).all(1) & torch.isfinite(adv).flatten(1).all(1)).cpu()
            _fill_rows(out, idx, logits.argmax(1).cpu(), margin(logits, yb[sub]).cpu(), finite)
        stats.update((adv - xb[sub]).flatten(1), adv, finite)
        if probe is not None:  # every row was attacked (no accuracy-only): adv is the batch
            self._probe_batch(lad, probe, (b, i), (xb, adv, yb))

    def _probe_batch(self, lad: Ladder, probe: CellProbe, where: tuple[int, int], batch: tuple) -> None:
        """Probe one batch, ``pass_rows`` rows at a time; keep each recorded clean pass for the
        model's next ladders (within budget)."""
        (b, i), (xb, adv, yb) = where, batch
        rows = self.pass_rows or len(xb)
        for j in range(0, len(xb), rows):
            part, key = slice(j, j + rows), (b, j)
            with rows_of_pass(part, len(xb)):  # a held intervention's clean gates: these rows'
                lad.frozen_clean[key], snap = probe.add(
                    lad.sm.model, xb[part], adv[part], yb[part], i + j,
                    frozen_clean=lad.frozen_clean.get(key), clean=lad.snaps.get(key),
                )  # fmt: skip
            if key not in lad.snaps and lad.snaps.budget >= snapshot_bytes(snap):  # reuse the clean pass
                lad.snaps[key] = snap
                lad.snaps.budget -= snapshot_bytes(snap)

    def write_cell(self, lad, e, result, stats, probe, seconds) -> None:
        """One cell, its per-example rows and (with probes) its site tables, in one transaction.

        ``result`` = (pred, margin, correct) per example.
        """
        assert self.store is not None
        pred, adv_margin, correct = result
        n, ok = len(pred), stats.nonfinite == 0
        cell = Cell(
            lad.sm.label, lad.atk.name, lad.key, lad.atk.norm, e, n, int(correct.sum()), seconds,
            "done" if ok else "failed", None if ok else f"{stats.nonfinite} non-finite rows",
            stats.linf, stats.l2, stats.min, stats.max, stats.nonfinite,
        )  # fmt: skip
        clean = lad.clean
        columns = [
            range(n), self.y_all.cpu().tolist(), clean.pred.tolist(), pred.tolist(), correct.int().tolist(),
            torch.nan_to_num(clean.margin).tolist(), torch.nan_to_num(adv_margin).tolist(),
        ]  # fmt: skip
        tables = None
        if probe is not None:
            measured = probe.example_columns()
            columns += [measured.get(c, [None] * n) for c in PROBE_COLUMNS]
            tables = probe_tables(probe)
        stale = lad.sm.label in self.stale
        self.store.write_cell(cell, zip(*columns, strict=True), tables, replace_model=stale)
        self.stale.discard(lad.sm.label)
        if self.debug:
            acc = cell.correct / n
            self.debug(
                f"  {cell.model} {cell.attack} eps={e:g}: accuracy {acc:.4f} ({cell.seconds:.1f}s, {cell.status})"
            )


def _fill_rows(out: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, pred, marg, finite):
    """Write predictions and margins at rows ``idx`` of ``out``; return ``finite``."""
    out[0][idx], out[1][idx] = pred, marg
    return finite


def merge_rows(dst: Sequence[torch.Tensor], parts: list[Any], bs: int, world: int) -> None:
    """Fill ``dst`` batch by batch from the gathered ``parts`` of the rank that computed each batch
    (batch b runs on rank b mod world; each part starts with its copies of ``dst``)."""
    for b, i in enumerate(range(0, len(dst[0]), bs)):
        for d, src in zip(dst, parts[b % world], strict=False):
            d[i : i + bs] = src[i : i + bs]


def probe_tables(probe: CellProbe) -> dict[str, Any]:
    """The site tables a probed cell writes beside its per-example rows."""
    return {
        "sites": probe.site_rows(),
        "site_examples": probe.subsample_rows(),
        "excitations": probe.excitation_rows(),
        "gallery": probe.gallery_rows(),
    }
