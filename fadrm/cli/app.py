"""The Typer application, the options every command shares, and error handling."""

from __future__ import annotations

import functools
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from fadrm.config import Config, load_config
from fadrm.errors import FadrmError, Terminated, raise_terminated, storage_problem

app = typer.Typer(
    name="fadrm",
    help="FADRM dataset distillation: prepare -> squeeze -> select -> recover -> relabel -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameters file (missing default: built-in defaults).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override one value, dotted like `dvc exp run -S` (repeatable).", metavar="KEY=VALUE"),
]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="Named preset applied over the params file (`fadrm presets`).")]
NoTrackOpt = Annotated[bool, typer.Option("--no-track", help="Run without experiment tracking (MLflow).")]

DEFAULT_PARAMS = Path("params.yaml")


def config_from(params: Path, preset: str | None, overrides: list[str] | None) -> Config:
    """Resolve the configuration the way every command does."""
    return load_config(params, preset, overrides or [], params_required=params != DEFAULT_PARAMS)


DEBUG_ENV = "FADRM_DEBUG"


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback behind an error message.")] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("0", "", "false", "no")


def guarded(func):
    """Turn every failure into one red line and a non-zero exit status, never a traceback
    (``--debug`` shows it): user-caused errors (exit 2, or their own code), file-system failures
    (exit 2), an interrupt (130), and anything unexpected (exit 3, reported as a bug)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException, SystemExit):  # typer's own ways out
            raise
        except FadrmError as exc:
            _fail(exc, f"error: {exc}", exc.exit_code)
        except KeyboardInterrupt as exc:
            _stopped(exc)
        except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
            problem = storage_problem(exc, func.__name__, Path.cwd())
            if problem is not None:
                _fail(exc, f"error: {problem}", problem.exit_code)
            _fail(
                exc,
                f"error: unexpected {type(exc).__name__}: {exc} — this is a bug in fadrm; "
                "rerun with `fadrm --debug ...` for the traceback and report it",
                3,
            )

    return wrapper


def _stopped(exc: KeyboardInterrupt) -> None:
    # in a Prefect flow run Prefect's own SIGTERM handler raises first, then re-sends the signal to ours
    by_sigterm = isinstance(exc, Terminated)
    what = "stopped by SIGTERM" if by_sigterm else "interrupted"
    typer.secho(f"{what}; finished work is kept and a rerun resumes", fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(143 if by_sigterm else 130) from None


def _fail(exc: BaseException, message: str, code: int) -> None:
    if debugging():
        traceback.print_exception(exc)
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code) from None


def echo(message: str) -> None:
    typer.echo(message, err=True)


def main() -> None:
    """Console-script entry point."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun stops its workers itself, SIGTERM then SIGKILL:
        # a worker blocked in a collective would only see the exception once the collective gave up
        signal.signal(signal.SIGTERM, raise_terminated)
    sys.exit(app())
