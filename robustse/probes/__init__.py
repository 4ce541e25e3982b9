"""Probes: forward hooks that record gates, SE inputs/outputs and block outputs
(:mod:`~robustse.probes.capture`), gate interventions, the per-example measurements
(:mod:`~robustse.probes.metrics`) and a sweep cell's probe (:mod:`~robustse.probes.cell`). May
import :mod:`robustse.models`, :mod:`robustse.data` and :mod:`robustse.core`."""
