"""The ``fadrm`` command line: thin Typer adapters over the plain stage functions.

Every command takes ``-p/--params`` (default ``params.yaml``), ``--preset NAME`` and
repeatable ``-S key=value`` overrides spelled like ``dvc exp run -S``::

    fadrm run                                  # the whole pipeline on params.yaml
    fadrm squeeze --preset cifar10-cpu         # one stage, another preset
    fadrm recover -S recover.alpha=0.7         # one stage, one value changed

Errors a user can cause print one clear message and exit with status 2, never a traceback.
"""

from __future__ import annotations

from fadrm.cli import compare, lineage, orchestrate, stages  # noqa: F401  (each registers its commands)
from fadrm.cli.app import app, main

__all__ = ["app", "main"]
