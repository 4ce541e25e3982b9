"""Small shared types."""

from __future__ import annotations

from pathlib import Path

PathLike = str | Path

# The gate interventions a sweep attacks white-box, as models of their own (README "Metrics"):
# ``held_gates`` holds every gate at its clean value s(x) while the adversary perturbs x (clean
# logits unchanged), ``frozen_mean`` fixes the gates to their training-set means.
INTERVENTIONS = ("held_gates", "frozen_mean")
INTERVENTION_SEP = "@"  # an intervention's label: <model label>@<intervention>
MAX_RUNGS = 1_000  # epsilons in one ladder, on every path (CLI --eps, spec, API)
MAX_MODELS = 1_000  # checkpoints in one sweep or experiment (listed or matched)


def intervention_label(label: str, intervention: str) -> str:
    """The sweep label of ``intervention`` applied to the model labelled ``label``."""
    return f"{label}{INTERVENTION_SEP}{intervention}"


def split_intervention(label: str) -> tuple[str, str | None]:
    """(model label, intervention or None) of a sweep label."""
    base, sep, what = label.rpartition(INTERVENTION_SEP)
    return (base, what) if sep and what in INTERVENTIONS else (label, None)
