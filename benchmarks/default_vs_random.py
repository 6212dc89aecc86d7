"""The README's main job (params.yaml on the built-in subset): FADRM against random real images, over seeds.

    python benchmarks/default_vs_random.py              # seeds 0 1 2
    python benchmarks/default_vs_random.py --seeds 0 1 2 3

Per seed, the whole pipeline of params.yaml runs once with FADRM; the random-real-images run of
the same seed then reuses its prepared data and teacher (the same files, so the comparison holds
the teacher fixed) and redoes select, recover (a pass-through), relabel and evaluate under the same
protocol. Resumable: finished cells are kept in docs/benchmarks/default-vs-random.json; the table
goes to docs/default-vs-random.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench" / "default-vs-random"
RESULTS = ROOT / "docs" / "benchmarks" / "default-vs-random.json"
DOC = ROOT / "docs" / "default-vs-random.md"
METHODS = ("fadrm", "random")


def run_cell(method: str, seed: int) -> dict:
    from fadrm.config import load_config
    from fadrm.pipeline import run_pipeline

    out = OUT / f"{method}-s{seed}"
    if method != "fadrm":  # the same prepared data and teacher as FADRM's run of this seed
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "metrics").mkdir()
        for stage in ("prepare", "squeeze"):
            shutil.copytree(OUT / f"fadrm-s{seed}" / stage, out / stage, copy_function=os.link)
            shutil.copy(OUT / f"fadrm-s{seed}" / "metrics" / f"{stage}.json", out / "metrics" / f"{stage}.json")
    cfg = load_config(ROOT / "params.yaml", None, [f"method={method}", f"seed={seed}", f"out_dir={out}", "tracking.enabled=false"])
    start = time.perf_counter()
    summary = run_pipeline(cfg)
    return {
        "method": method,
        "seed": seed,
        "top1": summary["student_top1"],
        "teacher_top1": summary["teacher_top1"],
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for seed in args.seeds:
        for method in METHODS:
            key = f"{method} seed {seed}"
            if key in results:
                continue
            results[key] = run_cell(method, seed)
            print(json.dumps({key: results[key]}), flush=True)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    render(results)


def render(results: dict) -> None:
    import torch

    lines = [
        "# The README's main job: FADRM against random real images",
        "",
        "Written by `python benchmarks/default_vs_random.py` (data: `docs/benchmarks/default-vs-random.json`): "
        "`params.yaml` as `fadrm run` uses it (the built-in 6,000-image CIFAR-10 subset, IPC 10), one teacher per "
        "seed shared by both methods, the same relabel/evaluate protocol. Student top-1 after the last epoch; "
        f"measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}.",
        "",
        "| seed | teacher | FADRM | random real images | FADRM - random |",
        "|---|---|---|---|---|",
    ]
    seeds = sorted({r["seed"] for r in results.values()})
    gaps = []
    for seed in seeds:
        f, r = results.get(f"fadrm seed {seed}"), results.get(f"random seed {seed}")
        gap = f"{100 * (f['top1'] - r['top1']):+.1f}" if f and r else "-"
        if f and r:
            gaps.append(f["top1"] - r["top1"])
        lines.append(
            f"| {seed} | {100 * f['teacher_top1']:.1f}% | {100 * f['top1']:.1f}% | "
            + (f"{100 * r['top1']:.1f}%" if r else "-")
            + f" | {gap} |"
            if f
            else f"| {seed} | - | - | - | - |"
        )
    for method in METHODS:
        values = [r["top1"] for r in results.values() if r["method"] == method]
        if len(values) > 1:
            lines.append(f"\n{method}: {100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}% (n={len(values)})")
    if len(gaps) > 1:
        mean, std = 100 * statistics.mean(gaps), 100 * statistics.stdev(gaps)
        lines.append(f"\nFADRM - random: {mean:+.1f} ± {std:.1f} points (n={len(gaps)})")
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
