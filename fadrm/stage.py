"""What every stage shares: where outputs live, what each needs, how a run is recorded.

Layout under ``out_dir`` (each stage folder is one DVC output)::

    prepare/ squeeze/ select/ recover/ relabel/ evaluate/    stage outputs
    metrics/<stage>.json                                      per-stage figures
    plots/<name>.json                                         curves (data; the PNGs are in the stage folders)
    metrics.json                                              the run summary, every figure
    headline.json                                             what `dvc metrics show` shows (see HEADLINE)
    efficiency.png                                            seconds per stage

A stage function opens :func:`stage_run`, writes into ``run.dir`` (a temporary folder) and
fills ``run.metrics``; on success the folder is renamed into place with ``stage.json``
(fingerprint, params) and the figures are written and reported to the tracker. On failure
nothing half-written is left where the output belongs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fadrm import __version__, distributed
from fadrm.config import STAGE_PARAMS, Config, dump_yaml, fingerprint
from fadrm.device import resolve_device
from fadrm.efficiency import StageMeter
from fadrm.errors import MissingInputError
from fadrm.io import STAGE_RECORD, atomic_dir, read_json, write_json
from fadrm.tracker import NULL_TRACKER, Tracker, flatten
from fadrm.visualize import bar_plot

STAGE_ORDER = ("prepare", "squeeze", "select", "recover", "relabel", "evaluate")

# Which earlier stages' outputs each stage reads.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "squeeze": ("prepare",),
    "select": ("prepare", "squeeze"),
    "recover": ("prepare", "squeeze", "select"),
    "relabel": ("prepare", "squeeze", "recover"),
    "evaluate": ("prepare", "squeeze", "recover", "relabel"),
}


@dataclass(frozen=True)
class Layout:
    """Paths of a pipeline's outputs under one root folder."""

    root: Path

    @classmethod
    def of(cls, cfg: Config) -> Layout:
        return cls(Path(cfg.out_dir))

    def stage(self, name: str) -> Path:
        return self.root / name

    def metrics(self, name: str) -> Path:
        return self.root / "metrics" / f"{name}.json"

    def plot(self, name: str) -> Path:
        return self.root / "plots" / f"{name}.json"

    @property
    def summary(self) -> Path:
        return self.root / "metrics.json"

    @property
    def headline(self) -> Path:
        return self.root / "headline.json"

    def partial(self, name: str) -> Path:
        """Where a long stage keeps finished pieces of work so that a rerun resumes."""
        return self.root / f".{name}.partial"


def stage_record(layout: Layout, name: str) -> dict[str, Any] | None:
    path = layout.stage(name) / STAGE_RECORD
    return read_json(path) if path.is_file() else None


def require(layout: Layout, stage: str, needed_by: str) -> dict[str, Any]:
    record = stage_record(layout, stage)
    if record is None:
        raise MissingInputError(
            f"'{needed_by}' needs the output of '{stage}' in {layout.stage(stage)}, which is missing; "
            f"run `fadrm {stage}` first (or `fadrm run` for the whole pipeline)"
        )
    return record


@functools.cache
def code_hash() -> str:
    """Hash of the package's source, so that changed code makes earlier outputs stale."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def input_fingerprints(name: str, layout: Layout) -> dict[str, str]:
    """The fingerprints of the stages ``name`` reads (a clear error if one is missing)."""
    return {dep: require(layout, dep, name)["fingerprint"] for dep in STAGE_INPUTS[name]}


def stage_fingerprint(name: str, cfg: Config, layout: Layout, inputs: dict[str, str] | None = None) -> str:
    """Hash of what determines a stage's output: params, inputs' fingerprints, the code."""
    inputs = input_fingerprints(name, layout) if inputs is None else inputs
    return fingerprint(
        {"stage": name, "params": cfg.sections(STAGE_PARAMS[name]), "inputs": inputs, "code": code_hash()}
    )


def is_current(name: str, cfg: Config, layout: Layout) -> bool:
    """True when the stage's output exists and was made from the same params, code and inputs,
    and every stage it reads from is current too."""
    record = stage_record(layout, name)
    if record is None or not all(is_current(dep, cfg, layout) for dep in STAGE_INPUTS[name]):
        return False
    try:
        return record["fingerprint"] == stage_fingerprint(name, cfg, layout)
    except MissingInputError:
        return False


@dataclass
class StageRun:
    """Handed to a stage body: where to write, where to put figures, which device."""

    name: str
    cfg: Config
    layout: Layout
    dir: Path
    device: torch.device
    tracker: Tracker
    metrics: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)  # files in the output folder to log

    def input(self, stage: str) -> Path:
        return self.layout.stage(stage)


@contextlib.contextmanager
def stage_run(name: str, cfg: Config, tracker: Tracker = NULL_TRACKER) -> Iterator[StageRun]:
    """Run a stage body with its inputs checked, its cost measured and its output atomic."""
    layout = Layout.of(cfg)
    inputs = input_fingerprints(name, layout)
    fp = stage_fingerprint(name, cfg, layout, inputs)
    params = cfg.sections(STAGE_PARAMS[name])
    device = resolve_device(cfg.device)
    tracker.log_params(flatten(params))
    meter = StageMeter(device)
    distributed.init(device)
    with atomic_dir(layout.stage(name), publish=distributed.is_main()) as tmp:
        run = StageRun(name, cfg, layout, tmp, device, tracker)
        with meter:
            yield run
        record = {"stage": name, "fingerprint": fp, "inputs": inputs, "params": params, "fadrm": __version__}
        write_json(tmp / STAGE_RECORD, record)
        (tmp / "config.yaml").write_text(dump_yaml(params))
    if not distributed.is_main():
        return
    run.metrics.update(seconds=round(meter.seconds, 3), peak_mem_mb=round(meter.peak_mb, 1))
    if "flops" in run.metrics and meter.seconds > 0:
        run.metrics["flops_per_s"] = run.metrics["flops"] / meter.seconds
    write_json(layout.metrics(name), run.metrics)
    for plot, rows in run.plots.items():
        write_json(layout.plot(plot), rows)
    tracker.log_metrics({k: v for k, v in flatten(run.metrics).items() if _is_number(v)})
    final = layout.stage(name)
    for rel in run.artifacts + ["config.yaml"]:
        tracker.log_artifact(final / rel)
    tracker.log_artifact(layout.metrics(name))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summarize(layout: Layout) -> dict[str, Any]:
    """Collect every stage's figures into ``<out>/metrics.json`` and the efficiency plot."""
    stages = {}
    for name in STAGE_ORDER:
        path = layout.metrics(name)
        if path.is_file():
            stages[name] = read_json(path)
    get = lambda stage, key: stages.get(stage, {}).get(key)  # noqa: E731
    summary = {
        "teacher_top1": get("squeeze", "teacher_top1"),
        "student_top1": get("evaluate", "top1"),
        "student_top5": get("evaluate", "top5"),
        "student_best_top1": get("evaluate", "best_top1"),
        "recover_s_per_image": get("recover", "s_per_image"),
        "recover_psnr": get("recover", "psnr_vs_init"),
        "relabel_bytes_per_image_epoch": get("relabel", "bytes_per_image_epoch"),
        "total_seconds": round(sum(s.get("seconds", 0.0) for s in stages.values()), 3),
        "stages": {
            name: {k: s.get(k) for k in ("seconds", "peak_mem_mb", "flops", "flops_per_s") if k in s}
            for name, s in stages.items()
        },
    }
    write_json(layout.summary, summary)
    write_json(layout.headline, headline(summary))
    rows = [{"stage": n, **{k: v for k, v in s.items() if k in ("seconds", "peak_mem_mb")}} for n, s in summary["stages"].items()]
    write_json(layout.plot("efficiency"), rows)
    if rows:
        bar_plot(rows, "stage", "seconds", layout.root / "efficiency.png", "time per stage", xlabel="seconds (log scale)",
                 log=True)
    return summary


# The few figures DVC tables show (`dvc metrics show`, `dvc exp show`): accuracy in percent like
# every other fadrm table, then cost. Short keys, so that the table fits a terminal; every other
# figure is in metrics.json (`dvc metrics show outputs/metrics.json`) and metrics/<stage>.json.
HEADLINE = {
    "student_top1_pct": ("student_top1", 100),
    "teacher_top1_pct": ("teacher_top1", 100),
    "recover_s_per_image": ("recover_s_per_image", 1),
    "total_seconds": ("total_seconds", 1),
}


def headline(summary: dict[str, Any]) -> dict[str, float | None]:
    """The headline figures of a run summary (missing ones as None)."""
    out = {}
    for key, (source, scale) in HEADLINE.items():
        value = summary.get(source)
        out[key] = None if value is None else round(value * scale, 4)
    return out
