"""Seed batching in a sweep (README "Seed batching"): the models of one architecture attacked at
once through one stacked network, each member's rows drawing what a call on it alone would draw
(:class:`SeedGroupSteps`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from robustse.attacks import Attack
from robustse.core.errors import ModelError
from robustse.data.base import to_float
from robustse.experiment.cells import CellSteps, Ladder, Opened, PerturbationStats, SweepModel, cell_stream
from robustse.models.eval_copy import reusing_copies
from robustse.models.stacked import MemberRows, member_rows, stack_models


def architecture_key(sm: SweepModel) -> str:
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


class SeedGroupSteps(CellSteps):
    """Grouping the models and attacking a group at once, for :class:`robustse.experiment.sweep.Sweep`."""

    models: list[SweepModel]
    attacks: list[Attack]
    ladders: dict[int, list[float]]
    budget_rows: int | None
    log: Callable[[str], None] | None

    if TYPE_CHECKING:  # the per-model steps, Sweep's

        def run_model(self, sm: SweepModel, ladders: list[tuple[Attack, list[float]]]) -> None: ...
        def _open(self, sm: SweepModel, *, share: int = 1) -> Opened: ...
        def compiles(self, models: list[SweepModel], ladders: list[list[tuple[Attack, list[float]]]]) -> bool: ...
        def _model_done(self, sm: SweepModel, atk: Attack, todo: list[float], train_forwards: list[int]) -> None: ...

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
            key = architecture_key(sm) if sm.hold is None and _stackable(sm) else id(sm)
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
            # the models stay as they are meanwhile: one eval copy each
            with reusing_copies(compiled=self.compiles(members, ladders)):
                for atk in self.attacks:
                    self._attack_group(atk, opened, ladders, stacked)
        finally:
            for o in opened:
                o.hook.remove()

    def _attack_group(self, atk: Attack, opened: list[Opened], ladders: list, stacked: MemberRows) -> None:
        """One attack's ladders on every member that has rungs left, stacked where they match."""
        todos = [dict((id(a), t) for a, t in mine).get(id(atk)) for mine in ladders]
        lads = [o.ladder(self.ladders, atk, t) for o, t in zip(opened, todos, strict=True) if t]
        self._run_ladders(lads, stacked, together=len(lads) == len(opened) and _same(todos))
        for o, todo in zip(opened, todos, strict=True):
            if todo:
                self._model_done(o.sm, atk, todo, o.train_forwards)

    def _run_ladders(self, lads: list[Ladder], stacked: MemberRows, *, together: bool) -> None:
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
