"""Regression checks: a run's figures against a baseline, under stated tolerances.

A baseline is a JSON file (``{"metrics": {...}, "params": {...}}``, committed under
``benchmarks/baselines/``) or an MLflow run (resolved by ``fadrm.tracking``). The verdict
says, per checked metric, the baseline, the current value, the change and the allowed drop,
and which params changed since the baseline — so a failing check explains itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fadrm.errors import ConfigError, FadrmError
from fadrm.io import read_json, write_json
from fadrm.tracker import flatten

IGNORED_PARAMS = ("tracking.", "regression.", "out_dir", "device")


class RegressionFailed(FadrmError):
    """At least one metric dropped by more than its tolerance."""

    exit_code = 1


@dataclass
class MetricCheck:
    metric: str
    baseline: float | None
    current: float | None
    tolerance: float
    passed: bool

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return self.current - self.baseline


@dataclass
class Verdict:
    passed: bool
    checks: list[MetricCheck]
    changed_params: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    baseline_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "baseline": self.baseline_source,
            "checks": [{**asdict(c), "change": c.change} for c in self.checks],
            "changed_params": {k: list(v) for k, v in self.changed_params.items()},
        }


def check(
    metrics: dict[str, Any],
    baseline: dict[str, Any],
    tolerances: dict[str, float],
    params: dict[str, Any],
    baseline_source: str = "",
) -> Verdict:
    """Compare ``metrics`` to ``baseline['metrics']``: a metric fails if it dropped by more than
    its tolerance (higher is better for every checked metric), or is missing from the run."""
    base_metrics = baseline.get("metrics", {})
    checks = []
    for metric, tolerance in sorted(tolerances.items()):
        old, new = base_metrics.get(metric), metrics.get(metric)
        passed = old is None or (new is not None and new >= old - tolerance)
        checks.append(MetricCheck(metric, old, new, tolerance, passed))
    changed = param_changes(baseline.get("params", {}), params)
    return Verdict(all(c.passed for c in checks), checks, changed, baseline_source)


def param_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Flattened params whose values differ (tracking/regression/output settings ignored)."""
    a, b = flatten(before), flatten(after)
    keys = sorted(set(a) | set(b))
    return {k: (a.get(k), b.get(k)) for k in keys if not k.startswith(IGNORED_PARAMS) and _canonical(a.get(k)) != _canonical(b.get(k))}


def _canonical(value: Any) -> str:
    """One spelling per value, whether it came from YAML, JSON or MLflow's string params."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = {"None": None, "True": True, "False": False}.get(value, value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True)


def read_baseline(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"baseline file not found: {path} (create one with `fadrm check --update-baseline`)")
    try:
        data = read_json(path)
    except ValueError as exc:
        raise ConfigError(f"baseline file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "metrics" not in data:
        raise ConfigError(f"{path} is not a baseline file (no 'metrics')")
    return data


def write_baseline(path: Path, metrics: dict[str, Any], params: dict[str, Any], note: str = "") -> None:
    write_json(Path(path), {"note": note, "metrics": metrics, "params": params})


def report_markdown(verdict: Verdict, title: str = "Regression check") -> str:
    """The verdict as Markdown (Prefect artifact, MLflow artifact, terminal)."""
    status = "PASSED" if verdict.passed else "FAILED"
    lines = [
        f"# {title}: {status}",
        "",
        f"Baseline: `{verdict.baseline_source}`",
        "",
        "| metric | baseline | current | change | allowed drop | |",
        "|---|---|---|---|---|---|",
    ]

    def fmt(value):
        return "-" if value is None else f"{value:.4f}"

    for c in verdict.checks:
        lines.append(
            f"| {c.metric} | {fmt(c.baseline)} | {fmt(c.current)} | {fmt(c.change)} | {c.tolerance:.4f} | "
            f"{'ok' if c.passed else '**regressed**'} |"
        )
    lines += ["", "Params changed since the baseline:" if verdict.changed_params else "No params changed since the baseline."]
    for key, (old, new) in verdict.changed_params.items():
        lines.append(f"- `{key}`: {old} -> {new}")
    return "\n".join(lines) + "\n"
