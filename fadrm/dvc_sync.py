"""Tell DVC about outputs produced outside ``dvc repro`` — the only module that imports DVC.

``fadrm run`` (with or without Prefect) makes the same outputs as ``dvc repro``; committing
them records the current params, dependencies and outputs of the pipeline's stages in
``dvc.lock`` and caches the outputs, so ``dvc status`` reports nothing to do and ``dvc push``
can send them. It is only right when the run used exactly what ``dvc.yaml`` describes: the
project's ``params.yaml`` with no preset flag or overrides on top.

An adapter like ``fadrm.tracking`` (MLflow): the CLI and the Prefect flows call it, the stage
functions never do.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from fadrm.config import Config, load_config

LOCK = Path("dvc.lock")


def sync_dvc(cfg: Config, params: str, preset: str | None, overrides: list[str] | None) -> str:
    """Commit the pipeline's outputs to DVC when that is truthful; say in one line what happened."""
    if not (Path("dvc.yaml").is_file() and Path(".dvc").is_dir()):
        return "not a DVC project here; nothing recorded"
    if preset or overrides or Path(params).resolve() != Path("params.yaml").resolve():
        return "run used a preset/overrides beyond params.yaml; dvc.lock left as is (use `dvc repro` for it)"
    if load_config("params.yaml") != cfg:
        return "params.yaml changed during the run; dvc.lock left as is"
    from dvc.repo import Repo

    before = LOCK.read_bytes() if LOCK.is_file() else None
    with _quiet("dvc"), Repo(".") as repo:
        repo.commit("dvc.yaml", force=True)  # every stage of dvc.yaml in one write of dvc.lock
    if before is not None and LOCK.read_bytes() == before:
        return "dvc.lock already matched these outputs"
    return "outputs committed to DVC (dvc.lock updated; `git add dvc.lock outputs`, then `dvc push`)"


@contextlib.contextmanager
def _quiet(name: str):
    """Hold back a library's INFO lines (DVC's 'Updating lock file'): we report the outcome once."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
