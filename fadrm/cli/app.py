"""The Typer application, the options every command shares, and error handling."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

from fadrm.config import Config, load_config
from fadrm.errors import FadrmError

app = typer.Typer(
    name="fadrm",
    help="FADRM dataset distillation: prepare -> squeeze -> select -> recover -> relabel -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="Parameters file (missing default: built-in defaults).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override one value, dotted like `dvc exp run -S` (repeatable).",
                 metavar="KEY=VALUE"),
]
PresetOpt = Annotated[
    str | None, typer.Option("--preset", help="Named preset applied over the params file (`fadrm presets`).")
]
NoTrackOpt = Annotated[bool, typer.Option("--no-track", help="Run without experiment tracking (MLflow).")]

DEFAULT_PARAMS = Path("params.yaml")


def config_from(params: Path, preset: str | None, overrides: list[str] | None) -> Config:
    """Resolve the configuration the way every command does."""
    return load_config(params, preset, overrides or [], params_required=params != DEFAULT_PARAMS)


def guarded(func):
    """Turn user-caused errors into one red line and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FadrmError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("interrupted; finished work is kept and a rerun resumes", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None

    return wrapper


def echo(message: str) -> None:
    typer.echo(message, err=True)


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
