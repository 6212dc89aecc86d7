"""Memory and disk per stage at ImageNet's shape: does the cost grow with the distilled set, not the data?

    python benchmarks/scale_memory.py                 # every cell in CELLS, cheapest first (resumable)
    python benchmarks/scale_memory.py --cells 100x4@1 1000x4@1
    python benchmarks/scale_memory.py docs            # only re-render docs/scale-memory.md

A cell ``CxN@IPC`` is a generated ImageNet-shaped dataset (``benchmarks/make_imagenet_like.py``:
C classes, N train and 1 val JPEG per class, 256 px files read at 224 px) run through the
``imagenet-1k`` preset with only the iteration counts cut: an untrained ResNet-18 teacher
(``squeeze.epochs=0``, no download), every real image a selection candidate (4 crops each),
recovery 200 px -> 224 px with one iteration per resolution (and the residual merge between),
one stored relabel epoch and one student epoch. Each stage runs as its own ``fadrm <stage>``
process, so its peak RSS (``wait4``'s ``ru_maxrss``) is its own; disk is the stage's output
folder (``du``), and the most the outputs grew while it ran (partial work and temporary folders).
Results: ``docs/benchmarks/scale-memory.json`` (one record per cell and stage) and
``docs/scale-memory.md``. Memory and bytes, not timings: the seconds are recorded, not judged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "outputs" / "bench" / "scale-memory"
RESULTS = ROOT / "docs" / "benchmarks" / "scale-memory.json"
DOC = ROOT / "docs" / "scale-memory.md"
STAGES = ("prepare", "squeeze", "select", "recover", "relabel", "evaluate")
KEPT = ("images", "views", "bytes_total", "bytes_per_image_epoch", "train_images")
# after the pipeline: the soft labels again, compact (top-10 logits in fp16 plus one fill value per view)
EXTRA = (("relabel top-10", "relabel", ("relabel.top_k=10",)),)
# cheapest first: the same distilled set over a 10x larger dataset, 10x the classes, then IPC 1/10/50
# over one dataset (10 classes), then the ImageNet-sized cells a CPU cannot finish in a session
# (select keeps one patch per real image: IPC x factor^2 = 4 IPC images per class at 224 px, 200 for IPC 50)
CELLS = ("100x4@1", "100x40@1", "1000x4@1", "10x50@1", "10x50@10", "10x200@50", "100x40@10", "1000x200@50")


def parse(cell: str) -> tuple[int, int, int]:
    shape, _, ipc = cell.partition("@")
    classes, _, train = shape.partition("x")
    return int(classes), int(train), int(ipc)


def dataset(classes: int, train: int) -> Path:
    dest = WORK / "data" / f"in{classes}x{train}"
    if not (dest / ".complete").is_file():
        command = [sys.executable, str(ROOT / "benchmarks" / "make_imagenet_like.py"), str(dest)]
        subprocess.run(command + ["--classes", str(classes), "--train", str(train), "--val", "1"], check=True)
        (dest / ".complete").write_text("")
    return dest


def overrides(cell: str) -> list[str]:
    classes, train, ipc = parse(cell)
    return [
        f"ipc={ipc}",
        "out_dir=outputs",
        f"data.path={dataset(classes, train)}",
        f"data.name=imagenet-like-{classes}",
        "data.workers=2",
        "squeeze.teachers=[{arch: resnet18, weights: null}]",
        "squeeze.epochs=0",
        f"select.candidates={train}",
        "select.crops_per_image=4",
        "select.batch_size=64",
        "recover.schedule=[[200, 1], [224, 1]]",
        "relabel.epochs=1",
        "evaluate.epochs=1",
        "evaluate.eval_every=1",
    ]


def du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_stage(cell_dir: Path, stage: str, cell: str, extra: tuple[str, ...] = ()) -> dict:
    command = [sys.executable, "-m", "fadrm", stage, "--preset", "imagenet-1k", "--no-track"]
    for item in overrides(cell) + list(extra):
        command += ["-S", item]
    outputs = cell_dir / "outputs"
    before = du(outputs)
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # the outputs folder's size while the stage runs (partial work included)
        while not done.wait(1.0):
            peak[0] = max(peak[0], du(outputs))

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cell_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cell} {stage} failed ({proc.returncode}):\n{stderr[-3000:]}")
    metrics = json.loads((outputs / "metrics" / f"{stage}.json").read_text())
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
        "disk_mb": round(du(outputs / stage) / 2**20, 2),
        "peak_extra_disk_mb": round((max(peak[0], du(outputs)) - before) / 2**20, 2),
        "seconds": round(time.perf_counter() - start, 1),
        "metrics": {k: metrics[k] for k in KEPT if k in metrics},
    }


def run_cell(cell: str, results: dict) -> None:
    classes, train, ipc = parse(cell)
    cell_dir = WORK / cell
    cell_dir.mkdir(parents=True, exist_ok=True)
    data = dataset(classes, train)
    for name, stage, extra in [(s, s, ()) for s in STAGES] + list(EXTRA):
        key = f"{cell} {name}"
        if key in results:
            continue
        record = {"cell": cell, "classes": classes, "train_per_class": train, "ipc": ipc, "stage": name}
        record["dataset_mb"] = round(du(data) / 2**20, 1)
        record.update(run_stage(cell_dir, stage, cell, extra))
        results[key] = record
        print(json.dumps(record), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def render(results: dict) -> None:
    import torch

    cells = list(dict.fromkeys(r["cell"] for r in results.values()))
    lines = [
        "# Memory and disk per stage at ImageNet's shape",
        "",
        "Written by `python benchmarks/scale_memory.py` (data: `docs/benchmarks/scale-memory.json`). Generated "
        "ImageNet-shaped data (224 px JPEGs, `benchmarks/make_imagenet_like.py`) through the `imagenet-1k` preset "
        "with the iteration counts cut (untrained ResNet-18 teacher, 1 recovery iteration per resolution, 1 relabel "
        "epoch, 1 student epoch); each stage its own process. Cell `CxN@IPC`: C classes, N train images per class, "
        f"IPC. Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores (fp32), Python "
        f"{platform.python_version()}, torch {torch.__version__}.",
        "",
        "Peak RSS (MB) of each stage's process:",
        "",
        "| cell | dataset MB | distilled images | " + " | ".join(STAGES) + " |",
        "|---|---|---|" + "---|" * len(STAGES),
    ]
    for cell in cells:
        rows = {s: results.get(f"{cell} {s}") for s in STAGES}
        first = next(r for r in rows.values() if r)
        classes, _, ipc = parse(cell)
        cols = [f"{rows[s]['peak_rss_mb']:.0f}" if rows[s] else "-" for s in STAGES]
        lines.append(f"| {cell} | {first['dataset_mb']:.0f} | {classes * ipc} | " + " | ".join(cols) + " |")
    lines += [
        "",
        "Disk (MB): each stage's output folder / the most the outputs grew while the stage ran (partial work, "
        "temporary folders and the published output; sampled every second):",
        "",
    ]
    lines += ["| cell | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
    for cell in cells:
        cols = []
        for s in STAGES:
            r = results.get(f"{cell} {s}")
            cols.append("-" if not r else f"{r['disk_mb']:.2f} / {r['peak_extra_disk_mb']:.2f}")
        lines.append(f"| {cell} | " + " | ".join(cols) + " |")
    lines += [
        "",
        "Stored soft labels per view (one image, one epoch): full fp16 logits vs `relabel.top_k: 10`:",
        "",
        "| cell | classes | fp16 bytes/view | top-10 bytes/view |",
        "|---|---|---|---|",
    ]
    for cell in cells:
        full, top = results.get(f"{cell} relabel"), results.get(f"{cell} relabel top-10")
        if full:
            per = lambda r: f"{r['metrics']['bytes_per_image_epoch']:.1f}" if r else "-"  # noqa: E731
            lines.append(f"| {cell} | {full['classes']} | {per(full)} | {per(top)} |")
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="run", choices=("run", "docs"))
    parser.add_argument("--cells", nargs="+", default=list(CELLS))
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.what == "run":
        for cell in args.cells:
            run_cell(cell, results)
            render(results)
    render(results)


if __name__ == "__main__":
    main()
