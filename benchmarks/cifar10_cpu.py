"""CPU benchmark on full CIFAR-10 (the `cifar10-cpu` preset): teacher, then the methods.

    python benchmarks/cifar10_cpu.py teacher                    # prepare + train the teacher (~17 min)
    python benchmarks/cifar10_cpu.py methods                    # random, rded, sre2l, fadrm with it
    python benchmarks/cifar10_cpu.py methods --teacher W.safetensors --methods fadrm rded
    python benchmarks/cifar10_cpu.py methods --methods fadrm --tag=-seed1 -S seed=1   # a variant
    python benchmarks/cifar10_cpu.py docs                       # re-render docs/benchmarks.md

Needs ../shared/data/cifar10-jpeg.tar.gz. Every method uses the same teacher, the same
relabel/evaluate protocol and seed; `sre2l` is the paper's efficiency baseline (noise init,
fp32, full resolution, 4000 iterations). Figures go to docs/benchmarks/cifar10_cpu_*.json
and the tables in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fadrm.config import RecoverConfig, load_config
from fadrm.data.facts import default_recover_crop_scale
from fadrm.data.prepared import Prepared
from fadrm.losses import BNStatsLoss
from fadrm.pipeline import run_pipeline
from fadrm.stage import Layout
from fadrm.stages.prepare import prepare
from fadrm.stages.recover import Teacher, recover_batch
from fadrm.stages.squeeze import squeeze
from fadrm.teachers import load_teachers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench" / "cifar10-cpu"
DOCS = ROOT / "docs" / "benchmarks"
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
METHOD_OVERRIDES = {
    "random": ["method=random"],
    "rded": ["method=rded"],
    "sre2l": ["method=sre2l", "recover.schedule=[[32, 4000]]"],
    "fadrm": ["method=fadrm"],
}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_avg_1min_at_end": os.getloadavg()[0]}


def config(out: Path, *overrides: str):
    return load_config(ROOT / "params.yaml", "cifar10-cpu",
                       [f"out_dir={out}", f"data.path={ARCHIVE}", "tracking.enabled=false", *overrides])


def teacher() -> dict:
    cfg = config(OUT / "teacher")
    prepare(cfg)
    start = time.perf_counter()
    metrics = squeeze(cfg)
    result = {"teacher_top1": metrics["teacher_top1"], "teacher_top5": metrics["teacher_top5"],
              "squeeze_seconds": metrics["seconds"], "wall_seconds": round(time.perf_counter() - start, 1),
              "squeeze": cfg.squeeze.model_dump(mode="json"), "machine": machine(),
              "weights": str(Layout.of(cfg).stage("squeeze") / "0-convnet.safetensors")}
    write(DOCS / "cifar10_cpu_teacher.json", result)
    return result


def methods(weights: Path, names: list[str], extra: list[str] = (), tag: str = "") -> dict:
    shared = OUT / "prepared"
    run_pipeline(config(shared), until="prepare")  # refreshed once here, not in every method's copy
    results = {}
    for name in names:
        out = OUT / f"{name}{tag}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(shared / "prepare", out / "prepare", copy_function=os.link)
        shutil.copytree(shared / "metrics", out / "metrics", copy_function=os.link)
        cfg = config(out, *METHOD_OVERRIDES[name], *extra, f"squeeze.teachers.0.weights={weights}")
        start = time.perf_counter()
        summary = run_pipeline(cfg, announce=lambda s, status, n=name: print(f"[{n}] {s}: {status}", flush=True))
        summary["wall_seconds"] = round(time.perf_counter() - start, 1)
        summary["overrides"] = [*METHOD_OVERRIDES[name], *extra]
        summary["load_avg_1min_at_end"] = os.getloadavg()[0]
        summary["torch_threads"] = torch.get_num_threads()
        write(out / "bench.json", summary)  # each method's figures survive an interrupted sweep
        results[f"{name}{tag}"] = summary
        print(json.dumps({name: {k: summary[k] for k in ("student_top1", "student_top5", "recover_s_per_image")}}),
              flush=True)
    payload = {"methods": collect(), "step_throughput": step_throughput(weights, config(OUT / f"{names[0]}{tag}")),
               "weights": str(weights), "machine": machine()}
    write(DOCS / "cifar10_cpu_methods.json", payload)
    return payload


def collect() -> dict:
    """Every finished method run under OUT, by name (random, rded, sre2l, fadrm first)."""
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted(OUT.glob("*/bench.json"))}
    order = [m for m in METHOD_OVERRIDES if m in found] + sorted(set(found) - set(METHOD_OVERRIDES))
    return {name: found[name] for name in order}


def step_throughput(weights: Path, cfg, batch: int = 100, steps: int = 30) -> dict:
    """Seconds per recovery step vs per plain training step of the same teacher, same batch."""
    data = Prepared(Layout.of(cfg).stage("prepare"))
    device = torch.device("cpu")
    (name, model), = load_teachers(Layout.of(cfg).stage("squeeze"), data, device, which="first")
    x = data.to_input(data.split("train").load(np.arange(batch), 32), device)
    y = torch.from_numpy(data.split("train").labels[:batch])
    rc = RecoverConfig(schedule=((32, steps),), lr=0.05)
    teacher_ = Teacher(name, model, BNStatsLoss(model))
    bounds = (data.normalize(torch.zeros(1, 3, 1, 1)), data.normalize(torch.ones(1, 3, 1, 1)))
    start = time.perf_counter()
    recover_batch(x, y, [teacher_], rc.schedule, rc, merges=True, bounds=bounds, jitter_limit=4,
                  crop_scale=default_recover_crop_scale(32), precision="fp32",
                  rng=np.random.default_rng(0))
    recover_step = (time.perf_counter() - start) / steps
    teacher_.bn.remove()
    train_model = model.train().requires_grad_(True)
    optimizer = torch.optim.SGD(train_model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(train_model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_step = (time.perf_counter() - start) / steps
    return {"batch": batch, "recover_step_s": round(recover_step, 4), "train_step_s": round(train_step, 4),
            "ratio": round(recover_step / train_step, 2)}


def write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def render_docs() -> Path:
    """docs/benchmarks.md from the JSON figures that exist."""
    lines = ["# Benchmarks", "", "Written by `python benchmarks/cifar10_cpu.py ...`; figures in `docs/benchmarks/*.json`.", ""]
    teacher_file = DOCS / "cifar10_cpu_teacher.json"
    if teacher_file.is_file():
        t = json.loads(teacher_file.read_text())
        lines += ["## Teacher (`fadrm squeeze --preset cifar10-cpu`, full CIFAR-10, 2 CPU cores)", "",
                  "| architecture | epochs | test top-1 | test top-5 | squeeze wall time |", "|---|---|---|---|---|",
                  f"| {t['squeeze']['teachers'][0]['arch']} | {t['squeeze']['epochs']} | {100 * t['teacher_top1']:.2f}% "
                  f"| {100 * t['teacher_top5']:.2f}% | {t['squeeze_seconds'] / 60:.1f} min |", ""]
    methods_file = DOCS / "cifar10_cpu_methods.json"
    if methods_file.is_file():
        m = json.loads(methods_file.read_text())
        header = ["| run | student top-1 | top-5 | best top-1 | recover s/image | recover peak MB | recover seconds "
                  "| load (1 min) | threads | overrides |", "|---|---|---|---|---|---|---|---|---|---|"]
        main_runs = {k: v for k, v in m["methods"].items() if k in METHOD_OVERRIDES}
        others = {k: v for k, v in m["methods"].items() if k not in METHOD_OVERRIDES}
        lines += ["## Methods at IPC 10 (same teacher, same relabel/evaluate protocol)", "",
                  "`python benchmarks/cifar10_cpu.py methods`: the preset's settings, one seed (0). "
                  "`load` is the 1-minute load average when the run ended (2 cores); s/image is wall time.", "",
                  *header, *map(_row, main_runs.items())]
        if others:
            lines += ["", "### Variants and seed replicates (`--tag` with `-S` overrides)", "",
                      "Timings compare only between runs with the same torch threads and no other load (a load "
                      "above the thread count means other jobs shared the cores); accuracies compare across all.", "",
                      *header, *map(_row, others.items())]
        st = m["step_throughput"]
        lines += ["", f"Recovery step vs plain training step of the teacher, batch {st['batch']}, 32 px, fp32: "
                  f"{st['recover_step_s']} s vs {st['train_step_s']} s ({st['ratio']}x).", "",
                  "Machine: " + ", ".join(f"{k} {v}" for k, v in m["machine"].items()), ""]
    path = ROOT / "docs" / "benchmarks.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _row(item: tuple[str, dict]) -> str:
    name, r = item
    rec = r["stages"].get("recover", {})
    spi = r.get("recover_s_per_image")
    return (f"| {name} | {100 * r['student_top1']:.2f}% | {100 * r['student_top5']:.2f}% | "
            f"{100 * r['student_best_top1']:.2f}% | {spi if spi is not None else '-'} | "
            f"{rec.get('peak_mem_mb', '-')} | {rec.get('seconds', '-')} | "
            f"{'-' if (load := r.get('load_avg_1min_at_end')) is None else round(load, 2)} | "
            f"{r.get('torch_threads', '-')} | "
            f"`{' '.join(r.get('overrides', []))}` |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["teacher", "methods", "docs"], help="docs: only re-render docs/benchmarks.md")
    parser.add_argument("--teacher", type=Path, help="teacher weights (default: the `teacher` run's)")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_OVERRIDES), choices=list(METHOD_OVERRIDES))
    parser.add_argument("-S", "--set", dest="extra", action="append", default=[], help="extra override (all methods)")
    parser.add_argument("--tag", default="", help="suffix naming this variant in the results")
    args = parser.parse_args()
    if args.what == "docs":
        print(f"wrote {render_docs()}")
        return
    if not ARCHIVE.is_file():
        raise SystemExit(f"needs {ARCHIVE}")
    os.environ.setdefault("FADRM_PROGRESS", "0")
    if args.what == "teacher":
        print(json.dumps(teacher(), indent=2))
    else:
        weights = args.teacher or OUT / "teacher" / "squeeze" / "0-convnet.safetensors"
        methods(weights.resolve(), args.methods, args.extra, args.tag)
    print(f"wrote {render_docs()}")


if __name__ == "__main__":
    main()
