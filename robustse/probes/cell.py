"""Drift of a perturbation through the network: per example, per gate and per block.

For a batch x and its perturbation x' every gate gets the measurements of README "Metrics" (gate
drift as relative L2 and cosine distance, input and output drift of its SE block, channel gain,
and the split of the output change into its static and adaptive (gate-reaction) terms), every
block its amplification, and the output its sensitivity. :class:`CellProbe` collects them over the batches
of a sweep cell (aggregates per site, per-example values on a fixed subsample, per-class mean
excitations, the gate interventions); :func:`measure_drift` summarizes a set of examples for the CLI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robustse.models.eval_copy import copy_for, in_default_layout_if_needed
from robustse.probes import metrics as M
from robustse.probes.capture import Recorder, capture, fixed_gates

GATE_METRICS = (
    "gate_drift", "gate_cosine", "input_drift", "output_drift", "channel_gain",
    "adaptive_damping", "adaptive_share", "adaptive_alignment",
)  # fmt: skip
BLOCK_METRICS = ("amplification",)
SQUEEZE_METRICS = ("input_drift", "squeeze_drift", "squeeze_attenuation")  # kind "squeeze", per SE site
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class Snapshot:
    """Logits and everything :func:`~robustse.probes.capture` saw in one forward pass."""

    logits: torch.Tensor
    gates: dict[str, torch.Tensor]
    gate_inputs: dict[str, torch.Tensor]
    gate_outputs: dict[str, torch.Tensor]
    blocks: dict[str, torch.Tensor]
    site_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def snapshot_bytes(snap: Snapshot) -> int:
    """Memory held by a snapshot's tensors (an SE site's input is its gate's input: counted once)."""
    tables = (snap.gates, snap.gate_inputs, snap.gate_outputs, snap.blocks, snap.site_inputs)
    distinct = {id(t): t for table in tables for t in table.values()}
    return snap.logits.nbytes + sum(t.nbytes for t in distinct.values())


@torch.no_grad()
def snapshot(model: nn.Module, x: torch.Tensor) -> Snapshot:
    """One recorded forward pass of ``x``."""
    with capture(model) as rec:
        logits = model(x)
    return Snapshot(logits, rec.gates, rec.gate_inputs, rec.gate_outputs, rec.blocks, rec.site_inputs)


def site_metrics(
    clean: Snapshot, pert: Snapshot, x: torch.Tensor, x_p: torch.Tensor
) -> dict[tuple[str, str, str], torch.Tensor]:
    """Per-example values ``{(kind, site, metric): (B,)}`` for every gate and block."""
    out: dict[tuple[str, str, str], torch.Tensor] = {}
    for name, s in clean.gates.items():
        seen = (s, clean.gate_inputs[name], clean.gate_outputs[name])
        moved_site = (pert.gates[name], pert.gate_inputs[name], pert.gate_outputs[name])
        for metric, v in gate_metrics(seen, moved_site).items():
            out["gate", name, metric] = v
    for name, u in clean.site_inputs.items():
        for metric, v in squeeze_metrics(u, pert.site_inputs[name]).items():
            out["squeeze", name, metric] = v
    moved = M.relative_change(x, x_p)  # ‖δ‖/‖x‖, the same for every block
    for name, h in clean.blocks.items():
        out["block", name, "amplification"] = M.drift_ratio(M.relative_change(h, pert.blocks[name]), moved)
    return out


Site = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (s, u, y) of one gate in one pass


def gate_metrics(clean: Site, pert: Site) -> dict[str, torch.Tensor]:
    """Per-example ``GATE_METRICS`` of one gate from its clean and perturbed (s, u, y)."""
    (s, u, y), (s_p, u_p, y_p) = clean, pert
    inp, outp = M.relative_change(u, u_p), M.relative_change(y, y_p)
    damping, share, alignment = M.reaction_measures(*M.gate_reaction(u, u_p, s, s_p))
    return {
        "gate_drift": M.gate_drift(s, s_p),
        "gate_cosine": M.gate_cosine_distance(s, s_p),
        "input_drift": inp,
        "output_drift": outp,
        "channel_gain": M.drift_ratio(outp, inp),  # = M.channel_gain, drifts not recomputed
        "adaptive_damping": damping,
        "adaptive_share": share,
        "adaptive_alignment": alignment,
    }


def squeeze_metrics(u: torch.Tensor, u_p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example ``SQUEEZE_METRICS`` of one SE site from its clean and perturbed input u."""
    inp, squeezed = M.relative_change(u, u_p), M.squeeze_drift(u, u_p)
    return {"input_drift": inp, "squeeze_drift": squeezed, "squeeze_attenuation": M.drift_ratio(squeezed, inp)}


class _SiteReducer(Recorder):
    """A perturbed pass measured against a recorded clean one inside the hooks: each gating
    block's and block's tensors become their (B,) metrics as soon as they are seen, so the pass
    keeps only the gates (B, C), never a second set of activations."""

    keeps_tensors = False

    def __init__(self, clean: Snapshot, moved: torch.Tensor) -> None:
        super().__init__()
        self.clean, self.moved = clean, moved
        self.values: dict[tuple[str, str, str], torch.Tensor] = {}

    def se(self, name: str, u: torch.Tensor, y: torch.Tensor) -> None:
        c = self.clean
        seen = (c.gates[name], c.gate_inputs[name], c.gate_outputs[name])
        for metric, v in gate_metrics(seen, (self.gates[name], u, y)).items():
            self.values["gate", name, metric] = v

    def site(self, name: str, u: torch.Tensor) -> None:
        for metric, v in squeeze_metrics(self.clean.site_inputs[name], u).items():
            self.values["squeeze", name, metric] = v

    def block(self, name: str, h: torch.Tensor) -> None:
        drift = M.relative_change(self.clean.blocks[name], h)
        self.values["block", name, "amplification"] = M.drift_ratio(drift, self.moved)


@torch.no_grad()
def perturbed_pass(
    model: nn.Module, clean: Snapshot, x: torch.Tensor, x_p: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[tuple[str, str, str], torch.Tensor]]:
    """The forward pass of ``x_p``, measured against ``clean`` (the recorded pass of ``x``) as it runs.

    Returns:
        (logits, ``{gate: s'}``, ``{(kind, site, metric): (B,)}``): the same values as
        :func:`site_metrics` on a second snapshot, at the memory of one.
    """
    reducer = _SiteReducer(clean, M.relative_change(x, x_p))
    with capture(model, recorder=reducer):
        logits = model(x_p)
    kinds = ("gate", "squeeze", "block")  # the order of site_metrics: gates, SE sites, blocks
    return logits, reducer.gates, {k: v for kind in kinds for k, v in reducer.values.items() if k[0] == kind}


@dataclass
class CellProbe:
    """Collects one sweep cell's measurements batch by batch.

    Args:
        n: examples in the evaluation set (example ``idx`` is the row).
        subsample: how many leading example indices keep their per-site values (the evaluation set
            is itself a seeded random subset, so the leading rows are a fixed random sample).
        gallery: how many leading examples keep their adversarial image.
        gate_means: training-set mean excitations for ``frozen_mean`` (None: not evaluated).
        transfer: evaluate the gate interventions on the model's adversarials (``clean_gates``,
            ``frozen_mean``); off for a model that is itself an intervention.
        temperature: the model's calibration temperature T: KL and logit sensitivity are also
            recorded on logits / T (None: not recorded).
    """

    n: int
    subsample: int = 256
    gallery: int = 8
    gate_means: dict[str, torch.Tensor] | None = None
    transfer: bool = True
    temperature: float | None = None
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)
    class_sums: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    class_counts: dict[int, int] = field(default_factory=dict)
    images: dict[int, torch.Tensor] = field(default_factory=dict)
    seen: torch.Tensor | None = None  # (n,) bool: the examples measured here

    @classmethod
    def merge(cls, parts: list[CellProbe | None]) -> CellProbe:
        """One probe from those of several ranks, each of which measured some of the examples."""
        real = [p for p in parts if p is not None]
        first = real[0]
        out = cls(first.n, subsample=first.subsample, gallery=first.gallery, gate_means=first.gate_means,
                  transfer=first.transfer, temperature=first.temperature)  # fmt: skip
        for part in real:
            if part.seen is None:
                continue
            for table, mine in ((part.outputs, out.outputs), (part.values, out.values)):
                for key, t in table.items():
                    out._column(mine, key)[part.seen] = t[part.seen]
            for key2, v in part.class_sums.items():
                out.class_sums[key2] = out.class_sums.get(key2, 0) + v
            for c, k in part.class_counts.items():
                out.class_counts[c] = out.class_counts.get(c, 0) + k
            out.images.update(part.images)
            out.seen = part.seen.clone() if out.seen is None else out.seen | part.seen
        return out

    def _column(self, table: dict, key: Any) -> torch.Tensor:
        if key not in table:
            table[key] = torch.full((self.n,), float("nan"), dtype=torch.float64)
        return table[key]

    @torch.no_grad()
    def add(
        self,
        model: nn.Module,
        x: torch.Tensor,
        x_p: torch.Tensor,
        y: torch.Tensor,
        start: int,
        *,
        frozen_clean: torch.Tensor | None = None,
        clean: Snapshot | None = None,
    ) -> tuple[torch.Tensor | None, Snapshot]:
        """Measure the batch ``x`` → ``x_p`` of examples ``start ... start + B - 1``.

        Args:
            frozen_clean: the frozen_mean logits of ``x`` from an earlier call, if any.
            clean: the recorded clean pass of ``x`` from an earlier call, if any.

        Returns:
            (frozen_mean logits of ``x`` or None, the clean recorded pass): pass them back for the
            same batch at the next eps or attack to save their forward passes.
        """
        rows = slice(start, start + len(x))
        if self.seen is None:
            self.seen = torch.zeros(self.n, dtype=torch.bool)
        self.seen[rows] = True
        # the passes run the model's eval copy (folded batch norms, channels_last on a CPU): the
        # same function up to float rounding, faster (README "Performance")
        measured = in_default_layout_if_needed(
            model, lambda: self._passes(copy_for(model, x), (x, x_p, y), frozen_clean, clean)
        )
        clean, frozen_clean, cols, gates_p, site_values = measured
        for key, v in cols.items():
            self._column(self.outputs, key)[rows] = v.double().cpu()
        for site_key, v in site_values.items():
            self._column(self.values, site_key)[rows] = v.double().cpu()
        labels = y.cpu()
        gates = {name: s.double().cpu() for name, s in gates_p.items()}  # one copy per gate, not per class
        for c in labels.unique().tolist():
            mask = labels == c
            self.class_counts[c] = self.class_counts.get(c, 0) + int(mask.sum())
            for name, s in gates.items():
                key2 = (name, c)
                self.class_sums[key2] = self.class_sums.get(key2, 0) + s[mask].sum(0)
        for j in range(max(0, min(self.gallery - start, len(x)))):
            self.images[start + j] = x_p[j].float().cpu()
        return frozen_clean, clean

    def _passes(self, net: nn.Module, batch: tuple, frozen_clean: torch.Tensor | None, clean: Snapshot | None):
        """The probe's forward passes of ``batch`` = (x, x', y) through ``net``: (clean snapshot,
        frozen_mean logits of x, output columns, perturbed gates, site values)."""
        x, x_p, y = batch
        clean = clean if clean is not None else snapshot(net, x)
        f_p, gates_p, site_values = perturbed_pass(net, clean, x, x_p)
        f, delta = clean.logits, x_p - x
        cols = {
            "logit_sensitivity": M.logit_sensitivity(f, f_p, delta),
            "logit_change": M.logit_change(f, f_p),
            "kl": M.kl(f, f_p),
        }
        if self.temperature is not None:  # calibrated logits: the overall logit scale divided out
            t = self.temperature
            cols["kl_calibrated"] = M.kl(f / t, f_p / t)
            cols["logit_sensitivity_calibrated"] = cols["logit_sensitivity"] / t
        if clean.gates and self.transfer:
            frozen_clean = self._interventions(net, clean, batch, frozen_clean, cols)
        return clean, frozen_clean, cols, gates_p, site_values

    def _interventions(self, net, clean: Snapshot, batch: tuple, frozen_clean, cols: dict) -> torch.Tensor | None:
        """Add the gate interventions' columns for x' (README "Metrics"); the frozen_mean logits of x."""
        x, x_p, y = batch
        f, delta = clean.logits, x_p - x
        # clean_gates: x' flows through, every gate keeps s(x)
        with fixed_gates(net, clean.gates):
            f_cg = net(x_p)
        cols["cg_correct"] = (f_cg.argmax(1) == y).double()
        cols["cg_sensitivity"] = M.logit_sensitivity(f, f_cg, delta)
        if self.gate_means is not None:
            with fixed_gates(net, self.gate_means):
                if frozen_clean is None:
                    frozen_clean = net(x)
                f_fm = net(x_p)
            cols["fm_correct"] = (f_fm.argmax(1) == y).double()
            cols["fm_sensitivity"] = M.logit_sensitivity(frozen_clean, f_fm, delta)
        return frozen_clean

    # ------------------------------------------------------------------ rows for the store

    def example_columns(self) -> dict[str, list[float | None]]:
        """Per-example output measurements (None where not measured)."""
        return {k: [None if v != v else float(v) for v in t.tolist()] for k, t in self.outputs.items()}

    def site_rows(self) -> list[tuple[Any, ...]]:
        """(kind, site, metric, n, mean, sd, q05, q25, q50, q75, q95) per site and metric (NaN ignored)."""
        rows: list[tuple[Any, ...]] = []
        q = torch.tensor(QUANTILES, dtype=torch.float64)
        for (kind, site, metric), t in self.values.items():
            v = t[~t.isnan()]
            if v.numel() == 0:
                rows.append((kind, site, metric, 0, *([None] * (2 + len(QUANTILES)))))
                continue
            sd = float(v.std()) if v.numel() > 1 else 0.0
            rows.append((kind, site, metric, int(v.numel()), float(v.mean()), sd, *torch.quantile(v, q).tolist()))
        return rows

    def subsample_rows(self) -> list[tuple[Any, ...]]:
        """(idx, site, metric, value) for the leading ``subsample`` examples."""
        k = min(self.subsample, self.n)
        return [
            (i, site, metric, None if v != v else v)
            for (_kind, site, metric), t in self.values.items()
            for i, v in enumerate(t[:k].tolist())
        ]

    def excitation_rows(self) -> list[tuple[Any, ...]]:
        """(site, label, n, JSON mean excitation vector) of the perturbed pass, per gate and class."""
        return [
            (site, c, self.class_counts[c], json.dumps([round(v, 6) for v in (s / self.class_counts[c]).tolist()]))
            for (site, c), s in self.class_sums.items()
        ]

    def gallery_rows(self) -> list[tuple[Any, ...]]:
        """(idx, shape JSON, float32 bytes) of the kept adversarial images."""
        return [(i, json.dumps(list(img.shape)), img.numpy().tobytes()) for i, img in sorted(self.images.items())]
