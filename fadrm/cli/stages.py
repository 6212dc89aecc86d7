"""``fadrm <stage>``, ``fadrm run --local``, ``fadrm config`` and ``fadrm presets``."""

from __future__ import annotations

from typing import Annotated

import typer

from fadrm.cli.app import DEFAULT_PARAMS, NoTrackOpt, ParamsOpt, PresetOpt, SetOpt, app, config_from, echo, guarded
from fadrm.config import available_presets, dump_yaml, read_preset
from fadrm.pipeline import SHARDED, STAGES, summary_table
from fadrm.stage import STAGE_ORDER


def run_stage(name: str, params, preset, overrides, no_track: bool, shard: str | None = None) -> dict:
    """One stage, as the CLI and every DVC stage run it: config, tracking, the stage function.

    With ``shard`` ('i/N'), only that shard's units of work are done and nothing is published;
    the stage without ``--shard`` then assembles them (see fadrm.shards)."""
    from fadrm.tracking import open_tracker

    cfg = config_from(params, preset, overrides)
    if shard is not None:
        from fadrm.shards import Shard

        metrics = SHARDED[name](cfg, Shard.parse(shard))
        echo(f"{name} shard: " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
        return metrics
    with open_tracker(cfg, stage=name, enabled=not no_track) as tracker, tracker.stage(name) as stage_tracker:
        metrics = STAGES[name](cfg, stage_tracker)
    shown = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    echo(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
    return metrics


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


STAGE_HELP = {
    "prepare": "Validate the dataset and write its versioned, hashed (and for small images, cached) form.",
    "squeeze": "Train (or load) the teacher(s) and measure their test top-1.",
    "select": "Build IPC initial images per class from the teacher's best-scored real patches.",
    "recover": "Optimise the initial images by data residual matching (or a baseline method).",
    "relabel": "Record augmented views and the teachers' soft labels for them (or an online recipe).",
    "evaluate": "Train a student on the distilled set and test it on the real test split.",
}


ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        metavar="I/N",
        help="Do only shard I of N of the work (0 <= I < N) and publish nothing; the stage without --shard assembles the shards.",
    ),
]


def _register(name: str) -> None:
    if name in SHARDED:

        @guarded
        def command(
            params: ParamsOpt = DEFAULT_PARAMS,
            set_: SetOpt = None,
            preset: PresetOpt = None,
            no_track: NoTrackOpt = False,
            shard: ShardOpt = None,
        ) -> None:
            run_stage(name, params, preset, set_, no_track, shard)

    else:

        @guarded
        def command(
            params: ParamsOpt = DEFAULT_PARAMS,
            set_: SetOpt = None,
            preset: PresetOpt = None,
            no_track: NoTrackOpt = False,
        ) -> None:
            run_stage(name, params, preset, set_, no_track)

    command.__doc__ = STAGE_HELP[name]
    app.command(name=name, help=STAGE_HELP[name])(command)


for _name in STAGE_ORDER:
    _register(_name)


@app.command("config")
@guarded
def show_config(
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Print the resolved configuration as YAML (e.g. `fadrm config --preset smoke > params.yaml`)."""
    typer.echo(dump_yaml(config_from(params, preset, set_)), nl=False)


@app.command("presets")
@guarded
def list_presets() -> None:
    """List the named presets and what each is for."""
    for name in available_presets():
        read_preset(name)  # validates that it parses
        typer.echo(name)


def announce(stage: str, status: str) -> None:
    """How the in-process pipeline reports each stage on the terminal."""
    echo(f"[{stage}] {status}")


def print_summary(summary: dict) -> None:
    typer.echo(summary_table(summary))


ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun stages even when their outputs are current.")]
