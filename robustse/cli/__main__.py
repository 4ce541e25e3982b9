"""``python -m robustse.cli ...`` is ``robustse ...`` (torchrun launches it this way)."""

from robustse.cli import main

main()
