"""Shim: ``python cli.py ...`` is ``robustse ...``."""

from robustse.cli import main

if __name__ == "__main__":
    main()
