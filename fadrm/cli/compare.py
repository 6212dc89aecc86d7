"""``fadrm compare``: MLflow runs side by side — accuracy first, then the params that differ, then cost."""

from __future__ import annotations

import csv
import io
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fadrm.cli.app import DEFAULT_PARAMS, ParamsOpt, PresetOpt, SetOpt, app, config_from, guarded
from fadrm.tracking import SHORT_ID


class Format(str, Enum):
    table = "table"
    markdown = "markdown"
    csv = "csv"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metric_cell(key: str, value) -> str:
    """Accuracies in percent, as in every other table of fadrm; seconds and bytes as they are."""
    if ("top1" in key or "top5" in key) and isinstance(value, (int, float)):
        return f"{100 * value:.2f}%"
    return _cell(value)


def _label(run: dict) -> str:
    short = run["id"][:SHORT_ID]
    return run["name"] if short in (run["name"] or "") else f"{run['name']} ({short})"


def rows_of(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: status, accuracy, the params that differ, efficiency, other metrics."""
    header = ["", *map(_label, result["runs"])]
    rows = [["status", *(c["status"] for c in result["runs"])]]
    rows += [[k, *(_metric_cell(k, v) for v in values)] for k, values in result["accuracy"].items()]
    rows += [[f"param {k}", *map(_cell, v)] for k, v in result["params"].items()]
    rows += [[k, *map(_cell, v)] for k, v in result["efficiency"].items()]
    rows += [[f"metric {k}", *(_metric_cell(k, v) for v in values)] for k, values in result["metrics"].items()]
    return header, rows


def render(result: dict, fmt: Format) -> str:
    header, rows = rows_of(result)
    if fmt is Format.csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue()
    if fmt is Format.markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt_row(header), fmt_row(["-" * w for w in widths]), *map(fmt_row, rows)]) + "\n"


@app.command("compare")
@guarded
def compare(
    runs: Annotated[list[str] | None, typer.Argument(help="Run ids, unique id prefixes or run names (default: latest runs).")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: tracking.experiment).")] = None,
    latest: Annotated[int, typer.Option(help="Without RUNS: how many of the latest pipeline runs.")] = 5,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead.")] = None,
    all_params: Annotated[bool, typer.Option("--all-params", help="Show every param, not only those that differ.")] = False,
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Compare MLflow runs side by side: accuracy, the params that differ, then time and memory."""
    from fadrm.tracking import comparison, connect, find_runs

    cfg = config_from(params, preset, (set_ or []) + ([f"tracking.experiment={experiment}"] if experiment else []))
    client, experiment_id = connect(cfg)
    result = comparison(find_runs(client, experiment_id, runs or [], latest), all_params)
    text = render(result, fmt)
    if output:
        output.write_text(text)
        typer.echo(f"wrote {output}", err=True)
    else:
        typer.echo(text, nl=False)
