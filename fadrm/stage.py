"""What every stage shares: its lock, its lineage record, its cost, its atomic output.

A stage function opens :func:`stage_run`, writes into ``run.dir`` (a temporary folder) and
fills ``run.metrics``. :func:`stage_run` first refuses missing or damaged inputs, takes the
output folder's writer lock (:mod:`fadrm.lock`), and on success writes ``stage.json`` — the
fingerprint of the params, code, input outputs and outside files that made the output
(:mod:`fadrm.lineage`), plus a manifest of every file with its hash — renames the folder
into place and reports the figures to the tracker. On failure nothing half-written is left
where the output belongs. Layout and the stage graph live in :mod:`fadrm.layout`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fadrm import __version__, distributed
from fadrm.config import STAGE_PARAMS, Config, dump_yaml
from fadrm.device import configure_backends, resolve_device
from fadrm.efficiency import StageMeter
from fadrm.errors import storage_errors
from fadrm.io import STAGE_RECORD, HashCache, atomic_dir, read_json, write_json
from fadrm.layout import STAGE_INPUTS, STAGE_ORDER, Layout
from fadrm.lineage import Lineage, manifest_digest, manifest_of
from fadrm.lock import hold
from fadrm.tracker import NULL_TRACKER, Tracker, flatten
from fadrm.visualize import bar_plot

__all__ = [
    "STAGE_INPUTS",
    "STAGE_ORDER",
    "Layout",
    "StageRun",
    "is_current",
    "require",
    "stage_fingerprint",
    "stage_run",
    "summarize",
]


def is_current(name: str, cfg: Config, layout: Layout | None = None) -> bool:
    """True when the stage's output is whole and was made from today's params, code and inputs,
    and every stage it reads from is current too (see :class:`fadrm.lineage.Lineage`)."""
    return Lineage(cfg, layout).is_current(name)


def stale_reason(name: str, cfg: Config, layout: Layout | None = None) -> str | None:
    """None when current, else what changed (``"params changed: recover.lr (0.05 -> 0.1)"``)."""
    return Lineage(cfg, layout).stale_reason(name)


def require(cfg: Config, layout: Layout, name: str) -> dict[str, str]:
    """The digests of the outputs stage ``name`` reads; a clear error when one is missing or damaged."""
    return Lineage(cfg, layout).input_digests(name)


def stage_fingerprint(name: str, cfg: Config, layout: Layout | None = None) -> str:
    """The fingerprint the record of ``name``'s output made now would carry (names resumable work)."""
    lineage = Lineage(cfg, layout)
    return lineage.expected(name, lineage.input_digests(name), lineage.sources(name))["fingerprint"]


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """``{'data.source': 'tar'}`` -> ``{'data': {'source': 'tar'}}`` (the config as written in YAML)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


@dataclass
class StageRun:
    """Handed to a stage body: where to write, where to put figures, which device."""

    name: str
    cfg: Config
    layout: Layout
    dir: Path
    device: torch.device
    tracker: Tracker
    fingerprint: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)  # files in the output folder to log
    resumed_seconds: float = 0.0  # time spent before an interruption on work this run resumed

    def input(self, stage: str) -> Path:
        return self.layout.stage(stage)


@contextlib.contextmanager
def stage_run(name: str, cfg: Config, tracker: Tracker = NULL_TRACKER) -> Iterator[StageRun]:
    """Run a stage body with its inputs checked, its folder locked, its cost measured and its
    output atomic and recorded."""
    layout = Layout.of(cfg)
    Lineage(cfg, layout).input_digests(name)  # refuse missing/damaged inputs before creating anything
    main = distributed.is_main()  # torchrun helpers share rank 0's lock and publish nothing
    with storage_errors(name, layout.root), hold(layout) if main else contextlib.nullcontext():
        cache = HashCache(layout.hash_cache if main else None)
        lineage = Lineage(cfg, layout, cache)
        inputs = lineage.input_digests(name)
        try:
            sources: dict[str, str] | None = lineage.sources(name)
        except Exception:  # noqa: BLE001 - e.g. a dataset still to be downloaded: the body says what is wrong
            sources = None
        planned = lineage.expected(name, inputs, sources) if sources is not None else None
        params = nested(cfg.values(STAGE_PARAMS[name]))
        device = resolve_device(cfg.device)
        configure_backends(device, name)
        tracker.log_params(flatten(params))
        meter = StageMeter(device)
        distributed.init(device)
        with atomic_dir(layout.stage(name), publish=main) as tmp:
            run = StageRun(name, cfg, layout, tmp, device, tracker, fingerprint=planned["fingerprint"] if planned else "")
            with meter:
                yield run
            if main:
                record = planned or lineage.expected(name, inputs, lineage.sources(name))
                (tmp / "config.yaml").write_text(dump_yaml(params))
                files = manifest_of(tmp, HashCache(None))
                record = {
                    "stage": name,
                    **record,
                    "files": files,
                    "digest": manifest_digest(files),
                    "device": device.type,
                    "fadrm": __version__,
                }
                write_json(tmp / STAGE_RECORD, record)
        if not main:
            return
        final = layout.stage(name)
        for rel, (_, digest) in files.items():
            cache.remember(final / rel, digest)
        cache.close()
        run.metrics.update(seconds=round(meter.seconds + run.resumed_seconds, 3), peak_mem_mb=round(meter.peak_mb, 1))
        if run.resumed_seconds:
            run.metrics["resumed_seconds"] = round(run.resumed_seconds, 3)
        if "flops" in run.metrics and run.metrics["seconds"] > 0:
            run.metrics["flops_per_s"] = run.metrics["flops"] / run.metrics["seconds"]
        write_json(layout.metrics(name), run.metrics)
        for plot, rows in run.plots.items():
            write_json(layout.plot(plot), rows)
    tracker.log_metrics({k: v for k, v in flatten(run.metrics).items() if _is_number(v)})
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
            name: {k: s.get(k) for k in ("seconds", "peak_mem_mb", "flops", "flops_per_s") if k in s} for name, s in stages.items()
        },
    }
    write_json(layout.summary, summary)
    write_json(layout.headline, headline(summary))
    rows = [{"stage": n, **{k: v for k, v in s.items() if k in ("seconds", "peak_mem_mb")}} for n, s in summary["stages"].items()]
    write_json(layout.plot("efficiency"), rows)
    if rows:
        bar_plot(rows, "stage", "seconds", layout.root / "efficiency.png", "time per stage", xlabel="seconds (log scale)", log=True)
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
