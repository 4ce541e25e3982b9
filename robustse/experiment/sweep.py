"""Sweeps: models × attacks × epsilons over one evaluation set, into a resumable results store.

For every model the clean pass runs once and is reused by every cell. Cells run rung by rung (eps
ascending) and each is committed with its per-example rows in one transaction; the clean-input
gradient of attacks without a random start is cached per batch, so FGSM's whole ladder still costs
one backward pass per batch. A rerun skips finished cells; a killed sweep loses at most the cell
in flight. :class:`Sweep` runs the plan; the steps of one ladder are in
:mod:`~robustse.experiment.cells`, those of a stacked seed group in
:mod:`~robustse.experiment.seed_groups`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from robustse.analysis.stats import wilson_interval, worst_case_examples
from robustse.attacks import Attack, create_attack
from robustse.attacks.compiled import compiles_attacks, planned_passes
from robustse.attacks.evaluator import Evaluator, grad_bytes_per_row
from robustse.core.distributed import SINGLE, Dist
from robustse.core.errors import DataError, SpecError
from robustse.core.passes import pass_memory, pass_rows, rows_within
from robustse.core.progress import Progress
from robustse.core.roles import attack_role
from robustse.core.store import ResultsStore, attack_key
from robustse.data.base import Dataset, to_float
from robustse.data.folder import dataset_identity
from robustse.experiment.cells import (
    Clean,
    Opened,
    SnapCache,
    SweepModel,
    SweepOptions,
    SweepResult,
    merge_rows,
)
from robustse.experiment.checks import run_checks
from robustse.experiment.seed_groups import SeedGroupSteps, architecture_key
from robustse.models.checkpoint import weight_hash
from robustse.models.eval_copy import reusing_copies
from robustse.models.gates import find_gates
from robustse.models.layout import restore_strides, to_channels_last
from robustse.probes.metrics import margin


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


class Sweep(SeedGroupSteps):
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
        compiles_attacks(options.compile, self.device)  # refuses a bad setting before any work
        self.n_batches = 0  # batches of the evaluation set (set by _start)
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
        self.ladders_done = self.ladders_total = 0  # model × attack ladders with rungs to run
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
        unique = {id(sm.model): sm.model for sm in self.models}.values()  # interventions share their model's weights
        restore = to_channels_last(unique) if self.opt.channels_last else []
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
            result = self.finish()
            self.layout.barrier()  # ranks leave together, after rank 0's checks and exports
            return result
        finally:
            restore_strides(restore)
            if self.store is not None:
                self.store.close()

    def prepare(self, pairs: list[tuple[SweepModel, Attack]]) -> list[list[float]]:
        """Check the store is this sweep's (rank 0); the eps still to run per pair, on every rank."""
        todo_lists = None
        if self.store is not None:
            layout_name = "channels_last" if self.opt.channels_last else "contiguous"
            self.store.check_identity("memory_format", layout_name, "memory layout (--channels-last)")
            # attacks without exact differentiate the eval-mode copy (robustse.models.eval_copy);
            # a store from before it holds the model's own gradients: never mixed
            self.store.check_identity(
                "gradients", "eval_copy", "attack gradient path (cells from before the eval-mode copy)", legacy="model"
            )
            todo_lists = _prepare_store(self.store, self, pairs)
        todo_lists = self.layout.broadcast(todo_lists)
        assert todo_lists is not None
        return todo_lists

    def _start(self, plan: list[tuple[tuple[SweepModel, Attack], list[float]]]) -> None:
        """Put the data on the device once (uint8; batches are sliced there) and start the progress bar."""
        self.x_all, self.y_all = self.dataset.x.to(self.device), self.dataset.y.to(self.device)
        n, bs = len(self.y_all), self.opt.batch_size
        n_batches = self.n_batches = (n + bs - 1) // bs
        if self.debug and self.layout.is_main:
            self.debug(f"cells to run: {sum(len(todo) for _, todo in plan)} ({n} examples, batch {bs})")
        if self.opt.pass_rows is None:
            self.budget_rows = self._budget_rows()
            self.pass_rows = None if self.budget_rows >= bs else self.budget_rows
        show = self.opt.progress and self.layout.is_main
        total = sum(n_batches * len(todo) for _, todo in plan)
        self.bar = Progress(total, "sweep", show=show)
        self.ladders_total = sum(1 for _, todo in plan if todo)

    def _budget_rows(self) -> int:
        """The rows a gradient pass may take within the device's memory budget
        (:func:`robustse.attacks.pass_memory`), from the largest autograd graph per row of the
        models; logged when a batch does not fit."""
        x = to_float(self.x_all[:1])
        models = {architecture_key(sm) if sm.meta.get("arch") else id(sm.model): sm.model for sm in self.models}
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
            # the model stays as it is meanwhile: one eval copy for all its passes
            with reusing_copies(compiled=self.compiles([sm], [ladders])):
                for atk, todo in ladders:
                    if todo:
                        self.run_ladder(opened.ladder(self.ladders, atk, todo))
                        self._model_done(sm, atk, todo, opened.train_forwards)
        finally:
            opened.hook.remove()

    def compiles(self, models: list[SweepModel], ladders: list[list[tuple[Attack, list[float]]]]) -> bool:
        """Whether these models (one, or a seed group of one architecture) are attacked through a
        compiled forward (:func:`robustse.attacks.compiled.compiles_attacks`); logged when they are."""
        passes = sum(planned_passes([(a, len(t)) for a, t in mine], self.n_batches) for mine in ladders)
        chosen = compiles_attacks(self.opt.compile, self.device, arch=models[0].meta.get("arch"), passes=passes)
        if chosen and self.log and self.layout.is_main:
            self.log(f"{', '.join(sm.label for sm in models)}: attack passes compiled (torch.compile; the first "
                     "batch of each shape waits for the compiler)")  # fmt: skip
        return chosen

    def _open(self, sm: SweepModel, *, share: int = 1) -> Opened:
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
        return Opened(sm, ev, clean, SnapCache(_probe_cache_bytes() // share), train_forwards, hook)

    # ------------------------------------------------------------------- seeds attacked at once

    def _model_done(self, sm: SweepModel, atk: Attack, todo: list[float], train_forwards: list[int]) -> None:
        forwards = int(self.layout.all_sum(train_forwards[0]))
        if self.store is not None:
            self.store.update_model(sm.label, train_mode_forwards=forwards)
        self.ladders_done += 1
        if self.log and self.layout.is_main:
            k, n, left = self.ladders_done, self.ladders_total, self.bar.time_left()
            self.log(f"sweep: ladder {k}/{n} done ({sm.label} × {atk.name}, {len(todo)} eps), about {left} left")

    def clean_pass(self, sm: SweepModel, ev: Evaluator, train_forwards: list[int]) -> Clean:
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
    compile: str = "auto",
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
        channels_last: convert the models to channels_last memory layout for the sweep
            (restored afterwards): predictions, probes and interventions included; the attacks'
            gradient passes use channels_last on a CPU anyway (their eval-mode copy). The same
            function up to float rounding. Part of the store's identity: a store holds one
            layout's results.
        seed_batching: attack the models of one architecture (the seeds of a family member) at
            once through one stacked network (:mod:`robustse.models.stacked`): FGSM, PGD and the noise
            control; each model gets its own gradients and the random starts it gets alone, so its
            cells equal one-at-a-time cells up to float rounding. None (default): on a GPU only
            (slower than one at a time on a 2-core CPU). Never under torchrun.
        pass_rows: take input gradients and record probes this many rows of a batch at a time
            (:func:`robustse.attacks.pass_rows`): peak memory follows ``pass_rows``, not
            ``batch_size``; results equal up to float rounding. None: as many rows as fit the
            device's pass budget (:func:`robustse.attacks.pass_memory`), measured per model.
        compile: run the attacks' forward and backward passes through ``torch.compile``:
            ``auto`` (where measured to pay, :mod:`robustse.attacks.compiled`), ``on`` or ``off``.
            Probe passes and models with gate interventions stay eager. The same results up to
            float rounding.

    Returns:
        :class:`SweepResult` (on ranks other than 0: no tables, ``cells`` and ``robust`` None).

    Example:
        >>> run_sweep([SweepModel("m", model, "m.safetensors")], [create_attack("fgsm")],
        ...           [0, 0.03], ds, Path("reports/sweep"))  # doctest: +SKIP
    """
    options = SweepOptions(
        batch_size, accuracy_only, probes, probe_subsample, channels_last, progress, seed_batching, pass_rows, compile
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
        merge_rows((preds, margs, finite), parts, bs, layout.world)
        zero_grads = sum(p[3] for p in parts)
        prob_like = all(p[4] for p in parts)
    return Clean(preds, margs, finite), zero_grads / n, prob_like


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
