"""The core every layer stands on: errors, the registry helper, small shared types and limits,
strict JSON, safe file writing, the SQLite results store, run configuration (frozen dataclasses
loaded strictly from TOML by ``strict``), provenance, device choice, torchrun layout and the pass layout of
memory-budgeted gradient passes. Imports nothing else from robustse. ``errors``, ``types``,
``roles``, ``files``, ``jsonout``, ``store``, ``strict`` and ``config`` import no torch (the analysis layer
uses them)."""
