"""``fadrm status`` (what is stale, and why) and ``fadrm dvc-yaml`` (dvc.yaml's deps/params, generated)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fadrm.cli.app import DEFAULT_PARAMS, ParamsOpt, PresetOpt, SetOpt, app, config_from, echo, guarded


@app.command("status")
@guarded
def status(
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Say for every stage whether its output is current, and if not, what changed."""
    from fadrm.lineage import Lineage
    from fadrm.stage import STAGE_ORDER

    lineage = Lineage(config_from(params, preset, set_))
    stale = 0
    for name in STAGE_ORDER:
        reason = lineage.stale_reason(name)
        stale += reason is not None
        typer.echo(f"{name:<10}{'up to date' if reason is None else 'stale: ' + reason}")
    lineage.cache.close()
    if stale:
        echo(f"{stale} stage(s) to run: `fadrm run` redoes them")


@app.command("dvc-yaml")
@guarded
def dvc_yaml(
    path: Annotated[Path, typer.Option(help="The pipeline file.")] = Path("dvc.yaml"),
    write: Annotated[bool, typer.Option("--write", help="Rewrite its deps/params lists (nothing else).")] = False,
) -> None:
    """Check (exit 1 on drift) or rewrite dvc.yaml's deps/params from the stages' code and params."""
    from fadrm.codedeps import dvc_drift, dvc_lists, rewrite_dvc_yaml
    from fadrm.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"{path} not found")
    text = path.read_text()
    if write:
        path.write_text(rewrite_dvc_yaml(text, dvc_lists()))
        echo(f"wrote the deps and params of {path}")
        return
    problems = dvc_drift(text)
    for problem in problems:
        typer.echo(problem)
    if problems:
        echo(f"{path} has drifted from the stages' code and params: `fadrm dvc-yaml --write` fixes it")
        raise typer.Exit(1)
    echo(f"{path}: deps and params match the stages")
