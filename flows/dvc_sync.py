"""Tell DVC about outputs produced outside ``dvc repro`` (by ``fadrm run`` or a Prefect flow).

``dvc commit`` records the current params, dependencies and outputs of the pipeline's
stages in ``dvc.lock`` and caches the outputs, so ``dvc status`` reports nothing to do and
``dvc push`` can send them. It is only right when the run used exactly what ``dvc.yaml``
describes: the project's ``params.yaml`` with no preset flag or overrides on top.
"""

from __future__ import annotations

from pathlib import Path

from fadrm.config import Config, load_config
from fadrm.stage import STAGE_ORDER


def sync_dvc(cfg: Config, params: str, preset: str | None, overrides: list[str] | None) -> str:
    """Commit the pipeline's outputs to DVC when that is truthful; say what happened."""
    if not (Path("dvc.yaml").is_file() and Path(".dvc").is_dir()):
        return "not a DVC project here; nothing recorded"
    if preset or overrides or Path(params).resolve() != Path("params.yaml").resolve():
        return "run used a preset/overrides beyond params.yaml; dvc.lock left as is (use `dvc repro` for it)"
    if load_config("params.yaml") != cfg:
        return "params.yaml changed during the run; dvc.lock left as is"
    from dvc.repo import Repo

    with Repo(".") as repo:
        for stage in STAGE_ORDER:
            repo.commit(f"dvc.yaml:{stage}", force=True)
    return "outputs committed to DVC (dvc.lock updated; `dvc push` sends them)"
