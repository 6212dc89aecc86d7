"""One change at a time, through the CLI: the evaluation protocol, and FADRM's own knobs.

    python benchmarks/ablation.py protocol --teacher T.safetensors          # every variant x methods x seeds
    python benchmarks/ablation.py fadrm --teacher T.safetensors --workers 4
    python benchmarks/ablation.py protocol docs                              # re-render the table

Every run is `fadrm run --local --no-track --preset cifar10-cpu` on full CIFAR-10 with the same
teacher at IPC 10 and 300 student epochs, with the suite's base overrides, the method and the
variant's `-S` overrides on top (a variant may set the method itself). Suites:

- ``protocol``: the evaluation protocol as it was before (student batch 25, views at scale
  (0.08, 1), one CutMix box per 100 views) and one change at a time, on `random` and `rded`
  sets, which involve no recovery, so only the protocol differs;
- ``fadrm``: recovery's knobs under the adopted protocol (the preset's), with RDED and random
  real images as references.

Results: docs/benchmarks/ablation-<suite>.json (resumable: finished runs are kept) and
docs/ablation-<suite>.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench" / "ablation"
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
FADRM = [sys.executable, "-m", "fadrm"]  # this environment's CLI
SEEDS = (0, 1)


@dataclass(frozen=True)
class Suite:
    title: str
    intro: str
    base: tuple[str, ...]  # overrides of every run of the suite
    variants: dict[str, list[str]]
    methods: tuple[str, ...]
    reference: str  # the variant the others are compared with


# The protocol before the ablation (cifar10-cpu preset of 2026-11-24), spelled out so that
# later changes of the preset do not change what "before" means.
BEFORE = ("evaluate.batch_size=25", "relabel.crop_scale=[0.08,1.0]", "relabel.batch_size=100", "relabel.mode=stored")
ADOPTED = ["evaluate.batch_size=10", "relabel.crop_scale=[0.25,1.0]", "relabel.batch_size=10"]
SUITES = {
    "protocol": Suite(
        "Evaluation protocol ablation (CIFAR-10, IPC 10, ConvNet-64 teacher and student, 300 epochs)",
        "Each row changes one thing of the protocol as it was before (student batch 25, views cropped at scale "
        "(0.08, 1), one CutMix box per 100 views, 300 stored epochs of labels) and evaluates the same two kinds of "
        "distilled set with it: random real images and RDED's selected patches (no recovery).",
        BEFORE,
        {
            "before": [],
            "student batch 10": ["evaluate.batch_size=10"],
            "views crop (0.25, 1)": ["relabel.crop_scale=[0.25,1.0]"],
            "CutMix box per student batch": ["relabel.batch_size=25"],
            "live teacher (online labels)": ["relabel.mode=online"],
            "views crop (0.5, 1)": ["relabel.crop_scale=[0.5,1.0]"],
            "batch 10 + crop (0.25, 1)": ["evaluate.batch_size=10", "relabel.crop_scale=[0.25,1.0]"],
            "all four": [*ADOPTED, "relabel.mode=online"],
            # adopted from the rows above (stored labels: online gave +0.2, within the noise) ...
            "adopted (batch 10, crop 0.25, CutMix per batch)": ADOPTED,
            # ... its learning rate, and labels kept compactly (top-k logits per view)
            "adopted, student lr 0.002": [*ADOPTED, "evaluate.lr=0.002"],
            "adopted, student lr 0.005": [*ADOPTED, "evaluate.lr=0.005"],
            "adopted, top-5 labels": [*ADOPTED, "relabel.top_k=5"],
            "adopted, top-2 labels": [*ADOPTED, "relabel.top_k=2"],
        },
        ("random", "rded"),
        "before",
    ),
    "fadrm": Suite(
        "FADRM's recovery knobs (CIFAR-10, IPC 10, ConvNet-64 teacher and student, the preset's protocol)",
        "Each row is FADRM with one recovery setting changed from the preset's (4 x 250 iterations, step 0.02, "
        "alpha 0.5, merges towards each image's own real patch), next to RDED's patches and random real images "
        "under the same protocol.",
        (),
        {
            "fadrm (preset)": [],
            "random real images": ["method=random"],
            "rded": ["method=rded"],
            "re-chosen anchors (nearest real patch)": ["recover.anchor=nearest"],
            "step 0.05": ["recover.lr=0.05"],
            "step 0.01": ["recover.lr=0.01"],
            "alpha 0.3": ["recover.alpha=0.3"],
            "alpha 0.7": ["recover.alpha=0.7"],
            "re-chosen anchors, step 0.05": ["recover.anchor=nearest", "recover.lr=0.05"],
        },
        ("fadrm",),
        "fadrm (preset)",
    ),
}


def key(variant: str, method: str, seed: int) -> str:
    return f"{variant} | {method} | seed {seed}"


def base(args) -> list[str]:
    return ["--preset", args.preset, "-S", "tracking.enabled=false", "-S", f"data.path={args.data}", "-S", f"device={args.device}"]


def run_one(args, variant: str, method: str, seed: int) -> dict | None:
    """One `fadrm run` of a variant; its record (None when it was recorded before)."""
    name = key(variant, method, seed)
    if name in args.results:
        return None
    slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in f"{args.suite_name}-{variant}")
    out = OUT / f"{slug}-{method}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    shared = OUT / "prepared"
    out.mkdir(parents=True)
    shutil.copytree(shared / "prepare", out / "prepare", copy_function=os.link)
    shutil.copytree(shared / "metrics", out / "metrics", copy_function=os.link)
    overrides = [
        *args.suite.base,
        f"method={method}",
        *args.suite.variants[variant],
        f"seed={seed}",
        f"out_dir={out}",
        f"squeeze.teachers.0.weights={args.teacher}",
        *args.set,
    ]
    command = [*FADRM, "run", "--local", "--no-track", *base(args), *(a for o in overrides for a in ("-S", o))]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "FADRM_PROGRESS": "0"})
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "metrics.json").read_text())
    return {
        "name": name,
        "variant": variant,
        "method": method,
        "seed": seed,
        "overrides": args.suite.variants[variant],
        "top1": summary["student_top1"],
        "best_top1": summary["student_best_top1"],
        "teacher_top1": summary["teacher_top1"],
        "recover_psnr": summary.get("recover_psnr"),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "device": _device(),
        "command": "fadrm run --local --no-track --preset cifar10-cpu " + " ".join(f"-S {o}" for o in overrides),
    }


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"


def render(name: str, suite: Suite, results: dict, path: Path) -> Path:
    columns = suite.methods
    lines = [
        f"# {suite.title}",
        "",
        f"Written by `python benchmarks/ablation.py`. {suite.intro} Two seeds each; student top-1 after the last epoch.",
        "",
        "Machines: " + ", ".join(sorted({r.get("device", "?") for r in results.values()})) + ". On a GPU, relabel "
        "and evaluate run in bf16 autocast, so a cell's figure differs from a CPU (fp32) run of it the way "
        "another seed's does (protocol `before | random | seed 0`: 50.55% on an H200, 47.58% on 2 CPU cores); "
        "compare rows measured on the same machine.",
        "",
        "| change | "
        + (" | ".join(columns) if len(columns) > 1 else "student top-1 (%)")
        + f" | mean change vs {suite.reference} | overrides |",
        "|---|" + "---|" * len(columns) + "---|---|",
    ]
    ref = {m: [r["top1"] for r in results.values() if r["variant"] == suite.reference and r["method"] == m] for m in columns}
    measured = {r["variant"] for r in results.values()}
    for variant, overrides in suite.variants.items():
        if variant not in measured:
            continue
        cells, deltas = [], []
        for method in columns:
            values = [r["top1"] for r in results.values() if r["variant"] == variant and r["method"] == method]
            cells.append(_fmt(values))
            if values and ref[method]:
                deltas.append(statistics.mean(values) - statistics.mean(ref[method]))
        delta = f"{100 * statistics.mean(deltas):+.2f}" if deltas and variant != suite.reference else "-"
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {delta} | `{' '.join(overrides) or '-'}` |")
    missing = [v for v in suite.variants if v not in measured]
    if missing:
        lines += [
            "",
            f"Not run yet (`python benchmarks/ablation.py {name} --teacher T --only NAME`): "
            + "; ".join(missing)
            + ". The grid measures such changes too, seed by seed against the plain cells: "
            '`python benchmarks/grid.py run --variant NAME -S KEY=VALUE` (docs/benchmarks.md, "Variants").',
        ]
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
    parser.add_argument("suite", choices=list(SUITES))
    parser.add_argument("what", nargs="?", default="run", choices=["run", "docs"])
    parser.add_argument("--teacher", type=Path, help="teacher weights (.safetensors) trained by squeeze")
    parser.add_argument("--only", action="append", help="run only these variants")
    parser.add_argument("--data", type=Path, default=ARCHIVE, help="the CIFAR-10 tar.gz")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=1, help="runs at once (each a `fadrm run` process)")
    parser.add_argument("--preset", default="cifar10-cpu")
    parser.add_argument("-S", "--set", action="append", default=[], help="extra override of every run (last)")
    parser.add_argument("--results", type=Path, help="JSON of finished runs (default docs/benchmarks/ablation-SUITE.json)")
    parser.add_argument("--report", type=Path, help="Markdown table (default docs/ablation-SUITE.md)")
    args = parser.parse_args()
    args.suite_name, args.suite = args.suite, SUITES[args.suite]
    results_file = args.results or ROOT / "docs" / "benchmarks" / f"ablation-{args.suite_name}.json"
    report = args.report or ROOT / "docs" / f"ablation-{args.suite_name}.md"
    args.results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.what == "run":
        if args.teacher is None or not args.data.is_file():
            raise SystemExit(f"needs --teacher and {args.data}")
        args.teacher, args.data = args.teacher.resolve(), args.data.resolve()
        prepare = [*FADRM, "prepare", "--no-track", *base(args), "-S", f"out_dir={OUT / 'prepared'}"]
        if not (OUT / "prepared" / "prepare").is_dir():
            subprocess.run(prepare, cwd=ROOT, check=True, env={**os.environ, "FADRM_PROGRESS": "0"}, stdout=sys.stderr)
        cells = [(v, m, s) for v in args.only or args.suite.variants for s in SEEDS for m in args.suite.methods]
        with futures.ThreadPoolExecutor(args.workers) as pool:  # each cell is its own process
            for done in futures.as_completed([pool.submit(run_one, args, *cell) for cell in cells]):
                record = done.result()
                if record is None:
                    continue
                args.results[record.pop("name")] = record
                results_file.parent.mkdir(parents=True, exist_ok=True)
                results_file.write_text(json.dumps(args.results, indent=2) + "\n")
                print(f"{key(record['variant'], record['method'], record['seed'])}: {100 * record['top1']:.2f}%", flush=True)
    print(f"wrote {render(args.suite_name, args.suite, args.results, report)}")


if __name__ == "__main__":
    main()
