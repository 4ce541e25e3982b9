"""Sweeps: models × attacks × epsilons over one evaluation set, into a resumable results store.

For every model the clean pass runs once and is reused by every cell. Cells run rung by rung (eps
ascending) and each is committed with its per-example rows in one transaction; the clean-input
gradient of attacks without a random start is cached per batch, so FGSM's whole ladder still costs
one backward pass per batch. A rerun skips finished cells; a killed sweep loses at most the cell
in flight.
"""

from __future__ import annotations

import contextlib
import json
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from robustse.analysis.stats import wilson_interval, worst_case_examples
from robustse.attacks import Attack, create_attack
from robustse.attacks.evaluator import Evaluator, grad_bytes_per_row
from robustse.core.distributed import SINGLE, Dist
from robustse.core.errors import DataError, ModelError, SpecError
from robustse.core.passes import pass_memory, pass_rows, rows_of_pass, rows_within
from robustse.core.roles import attack_role
from robustse.core.store import PROBE_COLUMNS, Cell, ResultsStore, attack_key
from robustse.data.base import Dataset, to_float
from robustse.data.folder import dataset_identity
from robustse.experiment.checks import Check, run_checks
from robustse.models.checkpoint import weight_hash
from robustse.models.gates import find_gates
from robustse.models.stacked import MemberRows, member_rows, stack_models
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


def evalset_fingerprint(ds: Dataset) -> str:
    """SHA-256 of an evaluation set's name, split, images and labels."""
    import hashlib

    h = hashlib.sha256(f"{dataset_identity(ds.name)}|{ds.split}|{tuple(ds.x.shape)}|".encode())
    for t in (ds.x, ds.y):
        _hash_rows(h, t)
    return h.hexdigest()


FINGERPRINT_CHUNK = 1 << 26  # bytes hashed at a time: a large set (a scratch file) is never copied whole


def _hash_rows(h: Any, t: torch.Tensor) -> None:
    """Feed ``t``'s bytes (row-major) to the hash ``h`` a chunk of rows at a time, each chunk read
    in place (a copy only of a chunk that is not contiguous)."""
    row = max(1, t[:1].numel() * t.element_size())
    step = max(1, FINGERPRINT_CHUNK // row)
    for i in range(0, len(t), step):
        h.update(t[i : i + step].contiguous().numpy().data.cast("B"))


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


@dataclass
class _Rung:
    """The state a ladder carries from one rung to the next: per example, was it still classified
    correctly, its prediction and its margin (accuracy-only mode attacks the survivors only)."""

    correct: torch.Tensor
    pred: torch.Tensor
    margin: torch.Tensor


@dataclass
class _Ladder:
    """One model × attack ladder in progress: its rungs, what is left to run and its caches."""

    sm: SweepModel
    atk: Attack
    key: str
    eps: list[float]  # the attack's rungs (ascending)
    todo: list[float]
    ev: Evaluator
    clean: _Clean
    snaps: _SnapCache  # recorded clean passes of this model, shared by its ladders
    grads: dict[int, torch.Tensor | None] = field(default_factory=dict)  # clean-input gradient per batch
    frozen_clean: dict[tuple[int, int], torch.Tensor | None] = field(default_factory=dict)  # frozen_mean clean logits


class _SnapCache(dict):
    """Recorded clean passes of one model by batch, within a memory budget (bytes left)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget


@dataclass
class _Opened:
    """A model being attacked (:meth:`Sweep._open`): evaluator, clean pass, probe cache, the
    training-mode forward counter and its hook."""

    sm: SweepModel
    ev: Evaluator
    clean: _Clean
    snaps: _SnapCache
    train_forwards: list[int]
    hook: Any

    def ladder(self, sweep: Sweep, atk: Attack, todo: list[float]) -> _Ladder:
        """The ladder of ``atk`` on this model with the rungs ``todo`` left."""
        key = attack_key(atk.describe())
        return _Ladder(self.sm, atk, key, sweep.ladders[id(atk)], todo, self.ev, self.clean, self.snaps)


def _architecture(sm: SweepModel) -> str:
    """What must agree for models to be stacked: architecture and builder options."""
    return json.dumps([sm.meta.get("arch"), sm.meta.get("arch_kwargs")], sort_keys=True, default=str)


def _stackable(sm: SweepModel) -> bool:
    """Only robustse's own architectures are stacked: a foreign model may mix channels (a
    concatenation, a channel shuffle) in ways the stacked network cannot keep apart."""
    from robustse.models import model_info

    arch = sm.meta.get("arch")
    if not isinstance(arch, str) or ":" in arch:
        return False
    try:
        model_info(arch)
    except ModelError:
        return False
    return True


def _same(todos: list[Any]) -> bool:
    """Whether every member has the same rungs left (and has this attack at all)."""
    return all(t is not None and t == todos[0] for t in todos)


class Sweep:
    """One sweep's state and its steps: :meth:`prepare` the store, then per model a
    :meth:`clean_pass` and a :meth:`run_ladder` per attack, then :meth:`finish` (checks, exports,
    worst case). :func:`run_sweep` documents the arguments."""

    def __init__(
        self,
        models: Sequence[SweepModel],
        attacks: Sequence[Attack],
        epsilons: Sequence[float],
        dataset: Dataset,
        out_dir: Path,
        options: SweepOptions,
        *,
        device: torch.device | str = "cpu",
        layout: Dist = SINGLE,
        log: Callable[[str], None] | None = None,
        debug: Callable[[str], None] | None = None,
    ) -> None:
        self.models, self.attacks, self.dataset, self.out_dir = list(models), list(attacks), dataset, out_dir
        self.opt, self.device, self.layout, self.log, self.debug = options, torch.device(device), layout, log, debug
        self.labels = [m.label for m in models]
        if len(set(self.labels)) != len(self.labels):
            raise SpecError(f"model labels must be distinct (got {self.labels})")
        self.eps = sorted({float(e) for e in epsilons})
        if len(dataset) == 0:
            raise DataError(f"{dataset.name}: the evaluation set is empty")
        # survivors are a subset of a batch's rows: per-example held gates cannot follow them
        # (frozen_mean's means are the same for every row and can)
        held = [m.label for m in models if m.hold is not None and m.meta.get("intervention") != "frozen_mean"]
        if held and options.accuracy_only:
            raise SpecError(f"{held[0]}: a gate intervention cannot run with accuracy_only (it attacks whole batches)")
        self.ladders = {id(a): ladder_of(a, self.eps) for a in attacks}
        self.hashes = {sm.label: weight_hash(sm.model.state_dict()) for sm in models}
        self.stale: set[str] = set()  # models whose stored cells belong to weights that have since changed
        self.probes = options.probes and not options.accuracy_only
        self.store: ResultsStore | None = None
        self.computed = 0
        self.bar: Any = None
        self.x_all = self.y_all = torch.empty(0)
        # rows per gradient and probe pass (None: the whole batch), and the most rows the pass
        # budget allows: both set by _start, from options.pass_rows or a measurement
        self.pass_rows: int | None = options.pass_rows
        self.budget_rows: int | None = options.pass_rows

    # ----------------------------------------------------------------------------------- the run

    def run(self) -> SweepResult:
        """Run every cell not yet in the store; then check and summarize."""
        if self.layout.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.store = ResultsStore(self.out_dir / "results.db")
        pairs = attack_pairs(self.models, self.attacks)
        restore = _to_channels_last(self.models) if self.opt.channels_last else []
        try:
            plan = list(zip(pairs, self.prepare(pairs), strict=True))
            self._start(plan)
            with pass_rows(self.pass_rows):
                for group in self._groups():
                    ladders = [[(atk, todo) for (m, atk), todo in plan if m is sm] for sm in group]
                    if len(group) > 1:
                        self.run_group(group, ladders)
                    else:
                        self.run_model(group[0], ladders[0])
            self.bar.close()
            return self.finish()
        finally:
            _restore_strides(restore)
            if self.store is not None:
                self.store.close()

    def prepare(self, pairs: list[tuple[SweepModel, Attack]]) -> list[list[float]]:
        """Check the store is this sweep's (rank 0); the eps still to run per pair, on every rank."""
        todo_lists = None
        if self.store is not None:
            layout_name = "channels_last" if self.opt.channels_last else "contiguous"
            self.store.check_identity("memory_format", layout_name, "memory layout (--channels-last)")
            todo_lists = _prepare_store(self.store, self, pairs)
        todo_lists = self.layout.broadcast(todo_lists)
        assert todo_lists is not None
        return todo_lists

    def _start(self, plan: list[tuple[tuple[SweepModel, Attack], list[float]]]) -> None:
        """Put the data on the device once (uint8; batches are sliced there) and start the progress bar."""
        self.x_all, self.y_all = self.dataset.x.to(self.device), self.dataset.y.to(self.device)
        n, bs = len(self.y_all), self.opt.batch_size
        n_batches = (n + bs - 1) // bs
        if self.debug and self.layout.is_main:
            self.debug(f"cells to run: {sum(len(todo) for _, todo in plan)} ({n} examples, batch {bs})")
        if self.opt.pass_rows is None:
            self.budget_rows = self._budget_rows()
            self.pass_rows = None if self.budget_rows >= bs else self.budget_rows
        show = self.opt.progress and self.layout.is_main
        total = sum(n_batches * len(todo) for _, todo in plan)
        self.bar = tqdm(total=total, desc="sweep", unit="batch", disable=None if show else True, dynamic_ncols=True)

    def _budget_rows(self) -> int:
        """The rows a gradient pass may take within the device's memory budget
        (:func:`robustse.attacks.pass_memory`), from the largest autograd graph per row of the
        models; logged when a batch does not fit."""
        x = to_float(self.x_all[:1])
        models = {_architecture(sm) if sm.meta.get("arch") else id(sm.model): sm.model for sm in self.models}
        per_row = max((grad_bytes_per_row(m.to(self.device), x) for m in models.values()), default=0)
        rows = rows_within(pass_memory(self.device), per_row)
        if rows < self.opt.batch_size and self.log and self.layout.is_main:
            self.log(f"gradient and probe passes take {rows} rows at a time ({per_row / 2**20:.1f} MiB per row; "
                     "--pass-rows sets it)")  # fmt: skip
        return rows

    def run_model(self, sm: SweepModel, ladders: list[tuple[Attack, list[float]]]) -> None:
        """The clean pass of one model, then each of its attack ladders that has rungs left."""
        if not ladders:
            return
        opened = self._open(sm)
        try:
            for atk, todo in ladders:
                if todo:
                    self.run_ladder(opened.ladder(self, atk, todo))
                    self._model_done(sm, atk, todo, opened.train_forwards)
        finally:
            opened.hook.remove()

    def _open(self, sm: SweepModel, *, share: int = 1) -> _Opened:
        """A model ready to attack: on the device, in eval mode, counting training-mode forwards,
        with its evaluator and its clean pass done."""
        sm.model.to(self.device).eval()
        train_forwards = [0]  # forwards in training mode (a sanity check counts them)
        hook = sm.model.register_forward_pre_hook(
            lambda mod, inp, c=train_forwards: c.__setitem__(0, c[0] + int(any(m.training for m in mod.modules())))
        )
        ev = sm.evaluator()
        clean = self.clean_pass(sm, ev, train_forwards)
        # models open together share the probe cache's memory budget
        return _Opened(sm, ev, clean, _SnapCache(_probe_cache_bytes() // share), train_forwards, hook)

    # ------------------------------------------------------------------- seeds attacked at once

    def _groups(self) -> list[list[SweepModel]]:
        """The models in sweep order, those of one architecture and options together when seed
        batching is on (gate interventions always alone)."""
        batch = self.opt.seed_batching
        if batch is None:
            batch = self.device.type == "cuda"
        if not batch or self.layout.active:
            return [[sm] for sm in self.models]
        groups: dict[Any, list[SweepModel]] = {}
        for sm in self.models:
            key = _architecture(sm) if sm.hold is None and _stackable(sm) else id(sm)
            groups.setdefault(key, []).append(sm)
        return [g for group in groups.values() for g in self._fitting(group)]

    def _fitting(self, group: list[SweepModel]) -> list[list[SweepModel]]:
        """``group`` stacked when its K·B rows fit one pass (``pass_rows``, else the pass budget's
        rows), else one model at a time: a pass cut out of the stacked rows would split the
        members' rows."""
        rows = self.budget_rows
        if len(group) == 1 or rows is None or len(group) * self.opt.batch_size <= rows:
            return [group]
        if self.log and self.layout.is_main:
            self.log(f"{len(group)} models of {group[0].label}'s architecture: {len(group)}x{self.opt.batch_size} rows "
                     f"do not fit a pass of {rows}; attacked one at a time, not stacked")  # fmt: skip
        return [[sm] for sm in group]

    def run_group(self, members: list[SweepModel], ladders: list[list[tuple[Attack, list[float]]]]) -> None:
        """K ≥ 2 models of one architecture: each one's clean pass, then per attack its ladders,
        attacked all at once through one stacked network where the attack allows (README
        "Performance": seed batching) and one by one otherwise."""
        try:
            stacked = MemberRows(stack_models([sm.model.to(self.device) for sm in members]).eval())
        except ModelError:  # a module the stacked network cannot hold: one model at a time
            for sm, mine in zip(members, ladders, strict=True):
                self.run_model(sm, mine)
            return
        opened = [self._open(sm, share=len(members)) for sm in members]
        try:
            for atk in self.attacks:
                todos = [dict((id(a), t) for a, t in mine).get(id(atk)) for mine in ladders]
                lads = [o.ladder(self, atk, t) for o, t in zip(opened, todos, strict=True) if t]
                self._run_ladders(lads, stacked, together=len(lads) == len(members) and _same(todos))
                for o, todo in zip(opened, todos, strict=True):
                    if todo:
                        self._model_done(o.sm, atk, todo, o.train_forwards)
        finally:
            for o in opened:
                o.hook.remove()

    def _run_ladders(self, lads: list[_Ladder], stacked: MemberRows, *, together: bool) -> None:
        can = together and len(lads) > 1 and lads[0].atk.tiles_draws() and not self.opt.accuracy_only
        if not can:
            for lad in lads:
                self.run_ladder(lad)
            return
        grads: dict[int, torch.Tensor | None] = {}
        for rung, e in enumerate(lads[0].eps):
            if e in lads[0].todo:
                self._run_rungs_together(lads, stacked, (rung, e), grads)
        self.computed += sum(len(lad.todo) for lad in lads)

    def _run_rungs_together(self, lads, stacked, rung_eps, grads) -> None:
        """One rung of K ladders: every batch attacked for all members at once, then each member's
        adversarials predicted, measured and written as its own cell."""
        (rung, e), n, t0 = rung_eps, len(self.y_all), time.perf_counter()
        outs = [(lad.clean.pred.clone(), lad.clean.margin.clone()) for lad in lads]  # every row is attacked
        tallies = [(PerturbationStats(), self._probe(lad) if self.probes else None) for lad in lads]
        for b, i in enumerate(range(0, n, self.opt.batch_size)):
            where = (b, i, rung, e)
            advs = self._adversarials_together(lads, stacked, where, grads)
            rows = torch.arange(len(advs[0]))
            for lad, adv, out, tally in zip(lads, advs, outs, tallies, strict=True):
                self._score_rows(lad, where, (rows, adv), out, tally)
            self.bar.update(len(lads))
        seconds = (time.perf_counter() - t0) / len(lads)  # the rung's time, shared by its cells
        for lad, (pred, adv_margin), (stats, probe) in zip(lads, outs, tallies, strict=True):
            if self.store is not None:
                correct = pred == self.y_all.cpu()
                self.write_cell(lad, e, (pred, adv_margin, correct), stats, probe, seconds)

    def _adversarials_together(self, lads, stacked, where, grads) -> list[torch.Tensor]:
        """Each member's adversarials of one batch, from one attack call on the stacked network
        (each member gets its own gradients and the random draws it would get alone)."""
        b, i, rung, e = where
        k, bs, atk = len(lads), self.opt.batch_size, lads[0].atk
        xb, yb = to_float(self.x_all[i : i + bs]), self.y_all[i : i + bs]
        xs, ys = member_rows(xb, k), yb.repeat(k)
        if b not in grads:
            grads[b] = atk.clean_gradient(stacked, xs, ys, members=k)
        res = atk(stacked, xs, ys, epsilons=[e], grad0=grads[b], stream=cell_stream(b, e), members=k)
        return list(res.adversarials[0].view(k, len(yb), *xb.shape[1:]))

    def _model_done(self, sm: SweepModel, atk: Attack, todo: list[float], train_forwards: list[int]) -> None:
        forwards = int(self.layout.all_sum(train_forwards[0]))
        if self.store is not None:
            self.store.update_model(sm.label, train_mode_forwards=forwards)
        if self.log and self.layout.is_main:
            self.log(f"{sm.label} × {atk.name}: {len(todo)} eps done")

    def clean_pass(self, sm: SweepModel, ev: Evaluator, train_forwards: list[int]) -> _Clean:
        """Clean predictions and margins of every example; the model's row in the store (rank 0)."""
        clean, zero_frac, prob_like = _clean_pass(sm, ev, self.x_all, self.y_all, self.opt.batch_size, self.layout)
        if self.store is not None:
            self.store.write_model(
                sm.label, weight_hash=self.hashes[sm.label], checkpoint=sm.checkpoint, arch=sm.meta.get("arch"),
                n=len(self.y_all), clean_correct=int((clean.pred == self.y_all.cpu()).sum()),
                zero_grad_fraction=zero_frac, probability_like=int(prob_like), train_mode_forwards=train_forwards[0],
            )  # fmt: skip
        return clean

    # ------------------------------------------------------------------------------ one ladder

    def run_ladder(self, lad: _Ladder) -> None:
        """The cells ``lad.todo`` of one (model, attack) pair, rung by rung, each its own transaction.

        The clean-input gradient of attacks without a random start is computed once per batch and
        reused by every rung (FGSM's whole ladder costs one backward pass per batch). In
        accuracy-only mode a rung attacks only the examples that survived the rung below it; the
        others keep their earlier adversarial, which lies inside every larger ball. Under torchrun
        each rank runs its batches; the rung's results are gathered on every rank and rank 0
        writes them.
        """
        y_cpu = self.y_all.cpu()
        prev = _Rung(lad.clean.pred == y_cpu, lad.clean.pred.clone(), lad.clean.margin.clone())
        for rung, e in enumerate(lad.eps):
            if e in lad.todo and not self._done_elsewhere(lad, e):
                prev = self.run_rung(lad, rung, e, prev)
                self.computed += 1
            elif self.opt.accuracy_only:  # a finished rung (resumed run): its survivors seed the next one
                prev = self._stored_rung(lad, e)

    def _done_elsewhere(self, lad: _Ladder, e: float) -> bool:
        """Whether another process sweeping into the same store has finished this cell since the
        plan was made (two sweeps into one run directory share the work instead of colliding)."""
        done = None
        if self.store is not None:
            done = lad.sm.label not in self.stale and self.store.has_cell(lad.sm.label, lad.key, e)
        return bool(self.layout.broadcast(done))

    def _stored_rung(self, lad: _Ladder, e: float) -> _Rung:
        rows = self.layout.broadcast(self.store.cell_rows(lad.sm.label, lad.key, e) if self.store is not None else None)
        return _Rung(
            torch.tensor([bool(r[0]) for r in rows]),
            torch.tensor([r[1] for r in rows]),
            torch.tensor([r[2] for r in rows], dtype=lad.clean.margin.dtype),
        )

    def run_rung(self, lad: _Ladder, rung: int, e: float, prev: _Rung) -> _Rung:
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
            _merge_rows((pred, adv_margin), parts, self.opt.batch_size, self.layout.world)
            stats = PerturbationStats.merge([p[2] for p in parts])
            probe = CellProbe.merge([p[3] for p in parts]) if probe is not None else None
        correct = pred == self.y_all.cpu()
        if self.store is not None:
            self.write_cell(lad, e, (pred, adv_margin, correct), stats, probe, time.perf_counter() - t0)
        return _Rung(correct, pred, adv_margin)

    def _probe(self, lad: _Ladder) -> CellProbe:
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

    def _probe_batch(self, lad: _Ladder, probe: CellProbe, where: tuple[int, int], batch: tuple) -> None:
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

    # -------------------------------------------------------------------------------- the end

    def finish(self) -> SweepResult:
        """Sanity checks, exports and the worst case over attacks, from the store (rank 0)."""
        if self.store is None:
            return SweepResult(self.out_dir, None, None, [], self.computed)
        store, labels = self.store, self.labels
        keys = [attack_key(a.describe()) for a in self.attacks]
        examples = store.examples()  # read once: checks, exports and the worst case share it
        num_classes = len(self.dataset.classes)
        checks = run_checks(store, num_classes=num_classes, models=labels, attack_keys=keys, examples=examples)
        store.write_checks((c.model, c.name, c.status, c.detail) for c in checks)
        store.export_csv(self.out_dir / "results.csv", examples)
        store.export_parquet(self.out_dir / "results.parquet", examples)  # when pyarrow is installed
        cells = store.cells()
        cells = cells[cells.model.isin(labels) & cells.attack_key.isin(keys) & cells.eps.isin(self.eps)]
        robust = worst_case_accuracy(store, models=labels, attack_keys=keys, epsilons=self.eps, examples=examples)
        return SweepResult(self.out_dir, cells, robust, checks, self.computed)


def _fill_rows(out: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, pred, marg, finite):
    """Write predictions and margins at rows ``idx`` of ``out``; return ``finite``."""
    out[0][idx], out[1][idx] = pred, marg
    return finite


def probe_tables(probe: CellProbe) -> dict[str, Any]:
    """The site tables a probed cell writes beside its per-example rows."""
    return {
        "sites": probe.site_rows(),
        "site_examples": probe.subsample_rows(),
        "excitations": probe.excitation_rows(),
        "gallery": probe.gallery_rows(),
    }


def attack_pairs(models: Sequence[SweepModel], attacks: Sequence[Attack]) -> list[tuple[SweepModel, Attack]]:
    """Every (model, attack) pair a sweep runs, model by model: the gate attack (a probe) on models
    with gates only, and not on gate interventions (their gates are held)."""
    return [(sm, atk) for sm in models for atk in attacks if _runs_on(sm, atk)]


def _runs_on(sm: SweepModel, atk: Attack) -> bool:
    """The gate attack needs gates that can move; a gate intervention (gates pinned per batch)
    runs the engine's own attacks only (torchattacks attacks re-run on subsets of rows)."""
    if sm.hold is not None:
        return attack_role(atk.name) != "probe" and not atk.name.startswith("torchattacks:")
    return attack_role(atk.name) != "probe" or bool(find_gates(sm.model))


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
    seed_batching: bool | None = None,
    pass_rows: int | None = None,
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
        layout: the torchrun layout (:mod:`robustse.core.distributed`): batches are sharded over
            ranks, results gathered, and only rank 0 touches the store. Every rank must call
            this with the same arguments.
        channels_last: attack the models in channels_last memory layout (weights converted for
            the sweep, restored afterwards). The same function up to float rounding: measured on
            the project's 2-core CPU, PGD 1.15-1.25x faster; adversarials then equal torchattacks'
            on the channels_last model, and differ from the default layout's in a few pixels.
            Part of the store's identity: a store holds one layout's results.
        seed_batching: attack the models of one architecture (the seeds of a family member) at
            once through one stacked network (:mod:`robustse.models.stacked`): FGSM, PGD and the noise
            control; each model gets its own gradients and the random starts it gets alone, so its
            cells equal one-at-a-time cells up to float rounding. None (default): on a GPU only
            (slower than one at a time on a 2-core CPU). Never under torchrun.
        pass_rows: take input gradients and record probes this many rows of a batch at a time
            (:func:`robustse.attacks.pass_rows`): peak memory follows ``pass_rows``, not
            ``batch_size``; results equal up to float rounding. None: as many rows as fit the
            device's pass budget (:func:`robustse.attacks.pass_memory`), measured per model.

    Returns:
        :class:`SweepResult` (on ranks other than 0: no tables, ``cells`` and ``robust`` None).

    Example:
        >>> run_sweep([SweepModel("m", model, "m.safetensors")], [create_attack("fgsm")],
        ...           [0, 0.03], ds, Path("reports/sweep"))  # doctest: +SKIP
    """
    options = SweepOptions(
        batch_size, accuracy_only, probes, probe_subsample, channels_last, progress, seed_batching, pass_rows
    )
    sweep = Sweep(
        models, attacks, epsilons, dataset, out_dir, options, device=device, layout=layout, log=log, debug=debug
    )
    return sweep.run()


def _clean_pass(sm: SweepModel, ev: Evaluator, x: torch.Tensor, y: torch.Tensor, bs: int, layout: Dist):
    """Clean predictions and margins, the zero-gradient fraction and a probabilities test
    (``x``, ``y``: the evaluation set on the sweep's device).

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
        xb, yb = to_float(x[i : i + bs]), y[i : i + bs]
        with sm.batch(xb):
            logits, grad = ev.logits_and_grad(xb, yb)
        zero_grads += int((grad.flatten(1).abs().amax(1) == 0).sum())
        rows_sum_one = torch.allclose(logits.sum(1), torch.ones(len(logits), device=logits.device), atol=1e-3)
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


def cell_stream(batch: int, eps: float) -> int:
    """The random stream of one batch of a cell: a function of the batch number and the eps alone,
    so a cell draws the same random starts whatever else the ladder holds or ran before it (with
    the attack's seed: the same for every model, common random numbers for paired comparisons)."""
    return zlib.crc32(f"{batch}|{float(eps).hex()}".encode()) & 0x7FFFFFFF


def _to_channels_last(models: Sequence[SweepModel]) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """Convert the models' 4-d parameters and buffers to channels_last; (tensor, original strides).

    Converts as ``Module.to(memory_format=torch.channels_last)`` does, ambiguous shapes included
    (a (16, 1, 5, 5) weight counts as contiguous in both layouts, yet its strides steer the kernels).
    """
    converted = []
    unique = {id(sm.model): sm.model for sm in models}  # an intervention shares its model's weights
    for model in unique.values():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == 4:
                converted.append((t, t.stride()))
                t.data = t.data.to(memory_format=torch.channels_last)
    return converted


def _restore_strides(converted: list[tuple[torch.Tensor, tuple[int, ...]]]) -> None:
    """Put converted tensors back in their own strides, on whatever device the sweep left them."""
    for t, stride in converted:
        t.data = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t.data)


def _prepare_store(store: ResultsStore, sweep: Sweep, pairs: list[tuple[SweepModel, Attack]]) -> list[list[float]]:
    """Check the store is this sweep's, drop stale and failed cells; the eps still to run per (model, attack) pair."""
    # The same store must mean the same evaluation set and mode: never mix results.
    dataset = sweep.dataset
    store.check_identity("evalset", evalset_fingerprint(dataset), "evaluation set (dataset or --eval-subset)")
    store.check_identity("accuracy_only", str(bool(sweep.opt.accuracy_only)), "mode (--accuracy-only)")
    store.set_meta("classes", json.dumps(list(dataset.classes)))
    store.set_meta("dataset", dataset.name)
    store.record_roles({atk.name: atk.role for _, atk in pairs})  # a report reads them without the attacks
    for sm in sweep.models:
        old = store.model_hash(sm.label)
        if old is not None and old != sweep.hashes[sm.label]:  # retrained under the same name
            sweep.stale.add(sm.label)  # its cells are replaced when the first new one is committed
            if sweep.log:
                sweep.log(f"{sm.label}: weights changed since the stored results; recomputing its cells")
    return [  # failed cells are run again; their successors replace them in one transaction
        [e for e in sweep.ladders[id(atk)]
         if sm.label in sweep.stale or not store.has_cell(sm.label, attack_key(atk.describe()), e)]
        for sm, atk in pairs
    ]  # fmt: skip


def _probe_cache_bytes() -> int:
    """Memory for reusing recorded clean passes across cells: $ROBUSTSE_PROBE_CACHE_MB (512)."""
    import os

    try:
        return max(0, int(os.environ.get("ROBUSTSE_PROBE_CACHE_MB", "512"))) * 2**20
    except ValueError:
        return 512 * 2**20


def ladder_of(atk: Attack, eps: list[float]) -> list[float]:
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


def worst_case_accuracy(store: ResultsStore, *, models=None, attack_keys=None, epsilons=None, examples=None):
    """Robust accuracy per model, norm and eps with a 95% Wilson interval: an example counts as
    robust only if no attack of that norm fooled it (:func:`robustse.analysis.stats.worst_case_examples`).

    ``models``, ``attack_keys`` and ``epsilons`` restrict it to one sweep's cells (a store may hold
    more). ``examples``: the store's examples table if the caller has already read it.
    """
    import pandas as pd

    ex = store.examples() if examples is None else examples
    if models is not None:
        ex = ex[ex.model.isin(list(models))]
    if attack_keys is not None:
        ex = ex[ex.attack_key.isin(list(attack_keys))]
    if epsilons is not None:
        ex = ex[ex.eps.isin(list(epsilons))]
    per = worst_case_examples(ex)
    if per.empty:
        return pd.DataFrame(columns=["model", "norm", "eps", "n", "correct", "accuracy", "ci_low", "ci_high"])
    agg = per.groupby(["model", "norm", "eps"]).correct.agg(["size", "sum"]).reset_index()
    agg.columns = ["model", "norm", "eps", "n", "correct"]
    agg["accuracy"] = agg.correct / agg.n
    cis = [wilson_interval(int(c), int(k)) for c, k in zip(agg.correct, agg.n, strict=True)]
    agg["ci_low"], agg["ci_high"] = [c[0] for c in cis], [c[1] for c in cis]
    return agg
