"""Entry point of the ``natgrad`` console command.

It lives outside the ``natgrad`` package so that it runs before torch is imported: a Ctrl-C in
the first second or two, while ``import torch`` runs, then exits quietly with status 130 like
every later interruption, instead of printing an import traceback.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

EXIT_INTERRUPTED = 130


def main() -> int:
    """Import the command (and torch) and run it; Ctrl-C during the imports exits 130."""
    try:
        from natgrad.cli.main import main as run
    except KeyboardInterrupt:
        print("natgrad: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return run()
