"""The ``panal`` command line: one module per command group, shared helpers in :mod:`agent.cli.common`."""

from agent.cli.root import main

__all__ = ["main"]
