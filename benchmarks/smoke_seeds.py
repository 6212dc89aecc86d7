"""How much the `smoke` preset's figures move between seeds, and how far broken pipelines fall.

    python benchmarks/smoke_seeds.py                  # seeds 0-4 and the broken variants
    python benchmarks/smoke_seeds.py --seeds 8        # more seeds

The regression check (`fadrm check`) compares a smoke run with
benchmarks/baselines/smoke.json under `regression.tolerances`; the tolerances come from the
spread measured here, and the broken variants show that a broken pipeline falls well outside
them. Writes benchmarks/baselines/smoke-seeds.json and the table in
benchmarks/baselines/README.md. Runs are resumable: finished ones are kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from fadrm.config import load_config
from fadrm.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench" / "smoke-seeds"
RESULTS = ROOT / "benchmarks" / "baselines" / "smoke-seeds.json"
METRICS = ("teacher_top1", "student_top1", "recover_psnr")
BROKEN = {
    "student lr 1e-7": ["evaluate.lr=1e-7"],
    "no residual merge (alpha 1)": ["recover.alpha=1.0"],
    "untrained teacher": ["squeeze.epochs=0"],
}


def run(name: str, overrides: list[str], results: dict) -> dict:
    if name in results:
        return results[name]
    cfg = load_config(None, "smoke", [f"out_dir={OUT / name.replace(' ', '-')}", "tracking.enabled=false", *overrides])
    start = time.perf_counter()
    summary = run_pipeline(cfg, force=True)
    results[name] = {
        "overrides": overrides,
        "wall_seconds": round(time.perf_counter() - start, 1),
        **{k: summary.get(k) for k in METRICS},
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({name: results[name]}), flush=True)
    return results[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("FADRM_PROGRESS", "0")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    seeds = [run(f"seed {s}", [f"seed={s}"], results) for s in range(args.seeds)]
    broken = {name: run(name, overrides, results) for name, overrides in BROKEN.items()}
    render(seeds, broken)


def render(seeds: list[dict], broken: dict[str, dict]) -> None:
    def fmt(v, pct):
        return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.2f}")

    lines = ["| run | teacher top-1 | student top-1 | recover PSNR (dB) | wall s |", "|---|---|---|---|---|"]
    for i, r in enumerate(seeds):
        lines.append(
            f"| seed {i} | {fmt(r['teacher_top1'], 1)} | {fmt(r['student_top1'], 1)} | "
            f"{fmt(r['recover_psnr'], 0)} | {r['wall_seconds']} |"
        )
    stats = {}
    for key in METRICS:
        values = [r[key] for r in seeds]
        stats[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    lines.append(
        "| **mean ± std** (n={}) | {} | {} | {} | |".format(
            len(seeds), *(f"{fmt(m, k != 'recover_psnr')} ± {fmt(s, k != 'recover_psnr')}" for k, (m, s) in stats.items())
        )
    )
    for name, r in broken.items():
        lines.append(
            f"| broken: {name} (`{' '.join(r['overrides'])}`) | {fmt(r['teacher_top1'], 1)} | "
            f"{fmt(r['student_top1'], 1)} | {fmt(r['recover_psnr'], 0)} | {r['wall_seconds']} |"
        )
    readme = ROOT / "benchmarks" / "baselines" / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    start, end = "<!-- seeds:start -->", "<!-- seeds:end -->"
    table = "\n".join([start, *lines, end])
    text = text.split(start)[0] + table + text.split(end)[1] if start in text else text + "\n" + table + "\n"
    readme.write_text(text)
    print(f"wrote {readme}")


if __name__ == "__main__":
    main()
