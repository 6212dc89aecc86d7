"""Which part of the evaluation protocol costs accuracy: one change at a time, through the CLI.

    python benchmarks/ablation.py --teacher T.safetensors            # every variant, methods x seeds
    python benchmarks/ablation.py --teacher T.safetensors --only "student batch 10"
    python benchmarks/ablation.py docs                                # re-render docs/ablation.md

Every run is `fadrm run --local --no-track --preset cifar10-cpu` on full CIFAR-10 with the same
teacher, IPC 10, 300 student epochs, and the variant's `-S` overrides on top; the distilled
sets are `random` and `rded` (no recovery), so only the protocol differs. Results go to
docs/benchmarks/ablation.json (resumable: finished runs are kept) and docs/ablation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench" / "ablation"
RESULTS = ROOT / "docs" / "benchmarks" / "ablation.json"
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
FADRM = str(Path(sys.executable).parent / "fadrm")  # this environment's CLI
BASE = ["--preset", "cifar10-cpu", "-S", "tracking.enabled=false", "-S", f"data.path={ARCHIVE}"]

# The protocol before this ablation (cifar10-cpu preset of 2026-11-24), spelled out so that
# later changes of the preset do not change what "before" means.
BEFORE = ["evaluate.batch_size=25", "relabel.crop_scale=[0.08,1.0]", "relabel.batch_size=100", "relabel.mode=stored"]
VARIANTS: dict[str, list[str]] = {
    "before": [],
    "student batch 10": ["evaluate.batch_size=10"],
    "views crop (0.25, 1)": ["relabel.crop_scale=[0.25,1.0]"],
    "CutMix box per student batch": ["relabel.batch_size=25"],
    "live teacher (online labels)": ["relabel.mode=online"],
    "all four": ["evaluate.batch_size=10", "relabel.crop_scale=[0.25,1.0]", "relabel.batch_size=10",
                 "relabel.mode=online"],
}
METHODS = ("random", "rded")
SEEDS = (0, 1)


def key(variant: str, method: str, seed: int) -> str:
    return f"{variant} | {method} | seed {seed}"


def run_one(variant: str, method: str, seed: int, teacher: Path, results: dict) -> None:
    name = key(variant, method, seed)
    if name in results:
        return
    out = OUT / f"{variant.replace(' ', '-').replace(',', '').replace('(', '').replace(')', '')}-{method}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    shared = OUT / "prepared"
    out.mkdir(parents=True)
    shutil.copytree(shared / "prepare", out / "prepare", copy_function=os.link)
    shutil.copytree(shared / "metrics", out / "metrics", copy_function=os.link)
    overrides = [*BEFORE, *VARIANTS[variant], f"method={method}", f"seed={seed}", f"out_dir={out}",
                 f"squeeze.teachers.0.weights={teacher}"]
    command = [FADRM, "run", "--local", "--no-track", *BASE, *(a for o in overrides for a in ("-S", o))]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "FADRM_PROGRESS": "0"})
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "metrics.json").read_text())
    results[name] = {"variant": variant, "method": method, "seed": seed, "overrides": VARIANTS[variant],
                     "top1": summary["student_top1"], "best_top1": summary["student_best_top1"],
                     "teacher_top1": summary["teacher_top1"], "wall_seconds": round(time.perf_counter() - start, 1),
                     "command": "fadrm run --local --no-track --preset cifar10-cpu " + " ".join(f"-S {o}" for o in overrides)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{name}: {100 * summary['student_top1']:.2f}%", flush=True)


def render(results: dict) -> Path:
    lines = ["# Evaluation protocol ablation (CIFAR-10, IPC 10, ConvNet-64 teacher and student, 300 epochs)", "",
             "Written by `python benchmarks/ablation.py`. Each row changes one thing of the protocol as it was "
             "before (student batch 25, views cropped at scale (0.08, 1), one CutMix box per 100 views, 300 "
             "stored epochs of labels) and evaluates the same two kinds of distilled set with it: random real "
             "images and RDED's selected patches (no recovery), two seeds each. Student top-1, final epoch.", "",
             "| change | random | RDED | mean change vs before | overrides |", "|---|---|---|---|---|"]
    base = {m: [r["top1"] for r in results.values() if r["variant"] == "before" and r["method"] == m] for m in METHODS}
    for variant in VARIANTS:
        cells, deltas = [], []
        for method in METHODS:
            values = [r["top1"] for r in results.values() if r["variant"] == variant and r["method"] == method]
            cells.append(_fmt(values))
            if values and base[method]:
                deltas.append(statistics.mean(values) - statistics.mean(base[method]))
        delta = f"{100 * statistics.mean(deltas):+.2f}" if deltas and variant != "before" else "-"
        lines.append(f"| {variant} | {cells[0]} | {cells[1]} | {delta} | `{' '.join(VARIANTS[variant]) or '-'}` |")
    path = ROOT / "docs" / "ablation.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    text = " / ".join(f"{100 * v:.2f}" for v in values)
    if len(values) > 1:
        text += f" (mean {100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="run", choices=["run", "docs"])
    parser.add_argument("--teacher", type=Path, help="teacher weights (.safetensors) trained by squeeze")
    parser.add_argument("--only", action="append", choices=list(VARIANTS), help="run only these variants")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.what == "run":
        if args.teacher is None or not ARCHIVE.is_file():
            raise SystemExit(f"needs --teacher and {ARCHIVE}")
        prepare = [FADRM, "prepare", "--no-track", *BASE, "-S", f"out_dir={OUT / 'prepared'}"]
        subprocess.run(prepare, cwd=ROOT, check=True, env={**os.environ, "FADRM_PROGRESS": "0"}, stdout=sys.stderr)
        for variant in args.only or VARIANTS:
            for seed in SEEDS:
                for method in METHODS:
                    run_one(variant, method, seed, args.teacher.resolve(), results)
    print(f"wrote {render(results)}")


if __name__ == "__main__":
    main()
