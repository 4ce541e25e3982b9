"""The ``robustse`` command line (click). May import every other layer.

User errors (``RobustseError`` with exit code 2, and click usage errors) print one line,
``error: <message>``, on stderr and exit 2; failures of the run itself exit 1. No traceback
for anything the user can fix. :mod:`~robustse.cli.group` holds the group, its global options
and the error mapping; one module per command family adds its commands to it
(:mod:`~robustse.cli.model_commands`, :mod:`~robustse.cli.attack_commands`,
:mod:`~robustse.cli.run_commands`).
"""

from __future__ import annotations

import sys

from robustse.cli import attack_commands, model_commands, run_commands  # noqa: F401  (they add the commands)
from robustse.cli.attack_commands import parse_attack, parse_epsilons
from robustse.cli.group import cli
from robustse.cli.model_commands import _arch_and_weights

__all__ = ["cli", "main", "parse_attack", "parse_epsilons", "_arch_and_weights"]


def main() -> None:
    """Console-script entry point."""
    from robustse.core.allocator import tune_allocator

    tune_allocator()
    for stream in (sys.stdout, sys.stderr):  # a path of raw bytes prints as \xff escapes, never a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    cli(prog_name="robustse")
