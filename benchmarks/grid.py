"""The accuracy table: methods x IPC x seeds x students on one dataset, one protocol for all.

    python benchmarks/grid.py teachers                       # prepare + train the teachers (convnet, resnet18)
    python benchmarks/grid.py run                            # every cell; finished cells are skipped
    python benchmarks/grid.py run --ipc 10 --seeds 0 1 2 --methods rded fadrm --students convnet
    python benchmarks/grid.py run --variant spread-pick -S select.pick=spread --ipc 10 --methods fadrm --students convnet
    python benchmarks/grid.py run --variant psm4 -S recover.bn_groups=4 --baseline cpu ...  # against variant `cpu`
    python benchmarks/grid.py docs                           # re-render docs/benchmarks.md from the JSON

Defaults: full CIFAR-10 from ../shared/data/cifar10-jpeg.tar.gz (`--data` names another tar or
ImageFolder), the `cifar10-cpu` preset's protocol, IPC 1/10/50, methods random, rded, sre2l,
fadrm, fadrm+ (round-robin over every teacher), seeds 0-2, students convnet and resnet18.
Every method gets the same recovery budget (the preset's 4 x 250 iterations; sre2l runs them
at one resolution without merges) and the same relabel/evaluate settings.

A *set* (method, IPC, seed) is selected, recovered and relabelled once; each (set, student,
labels) is one *evaluation*: soft labels (the protocol) and hard labels (for DD-Ranking's
hard-label recovery). Each finished piece is a folder with a `done.json`, so a rerun skips it,
and every evaluation is a record in docs/benchmarks/cifar10-cpu.json (a JSON list: method, ipc,
seed, student, labels, top1 as a fraction, ...; `code` and `set_code`: the git commit the student's
and the set's code came from, `+changes` when the checkout's code differed from it). A grid's
workers keep the code they imported for the whole run: when the checkout moves meanwhile, the grid
says so. With tracking on, the run is one MLflow parent run with a child run per evaluation.
`--workers N` evaluates N cells at once (processes).
Stopped early (Ctrl-C, SIGTERM), the grid ends the cells in progress at once and closes its runs
KILLED (FAILED on an error), keeping the records made so far; a grid killed outright has its runs
closed KILLED by the next one on the host.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from grid_report import render  # noqa: E402

from fadrm.config import Config, load_config  # noqa: E402
from fadrm.errors import Terminated, raise_terminated  # noqa: E402
from fadrm.io import read_json, write_json  # noqa: E402
from fadrm.stage import Layout  # noqa: E402
from fadrm.tracking import git_commit  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
OUT = ROOT / "outputs" / "bench" / "grid"
RECORDS = ROOT / "docs" / "benchmarks" / "cifar10-cpu.json"
METHODS = ("random", "rded", "sre2l", "fadrm", "fadrm+")
TEACHER_ARCHS = ("convnet", "resnet18")
# Teacher training beyond the preset: ResNet-18 (CIFAR stem) gets its usual recipe.
TEACHER_OVERRIDES = {
    "convnet": [],
    "resnet18": ["squeeze.epochs=30", "squeeze.lr=0.1", "squeeze.batch_size=256"],
    "resnet20": ["squeeze.lr=0.1"],
}  # ResNet-20: FADRM+'s second teacher on CPUs, cut short like the preset's ConvNet-64 (squeeze.epochs)
SET_STAGES = ("squeeze", "select", "recover", "relabel")
# relative cost of making a set: the recovering methods first, so they are not the tail of a run
WORKER_PROGRESS_INTERVAL = 300  # seconds between two progress lines of one worker in the grid's log
SET_COST = {"fadrm+": 3, "fadrm": 2, "sre2l": 2, "rded": 1, "random": 0}
CODE_PATHS = ("fadrm", "flows", "benchmarks")  # what a set and its evaluation run


def code_version(root: Path = ROOT) -> str | None:
    """The commit this code was read from, ``+changes`` when its code differs from that commit; None
    outside a git checkout."""
    commit = git_commit(root)
    if commit is None:
        return None
    status = ["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS]
    changed = subprocess.run(status, cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("+changes" if changed else "")


# Read once, when the module is imported: a grid's worker processes keep the code they imported for
# the whole run, whatever the checkout becomes meanwhile; their records say which code made them.
CODE = code_version()


def checkout_moved(started: str | None, root: Path = ROOT) -> str | None:
    """A note when the checkout no longer holds the code this grid started with, else None."""
    now = code_version(root)
    if now == started:
        return None
    return (
        f"note: the checkout is now at {now}, but this grid's workers still run {started} (as their records "
        "say): stop and rerun the grid to measure the new code"
    )


def base_config(args, out: Path, *overrides: str) -> Config:
    return load_config(
        None,
        args.preset,
        [f"out_dir={out}", f"data.path={args.data}", f"device={args.device}", "tracking.enabled=false", *args.set, *overrides],
    )


def link_stage(src_root: Path, dest_root: Path, stage: str) -> None:
    """Hard-link a finished stage folder (and its figures) into another output root."""
    dest = dest_root / stage
    if dest.exists():
        return
    shutil.copytree(src_root / stage, dest, copy_function=os.link)
    if (src_root / "metrics" / f"{stage}.json").is_file():
        (dest_root / "metrics").mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / "metrics" / f"{stage}.json", dest_root / "metrics" / f"{stage}.json")


# ----------------------------------------------------------------------------- teachers


def prepared(args) -> Path:
    from fadrm.lock import OutputBusyError
    from fadrm.pipeline import run_pipeline

    root = args.out / "prepared"
    deadline = time.monotonic() + 3600
    while True:  # grids run side by side share one prepared dataset: wait for the one checking it
        try:
            run_pipeline(base_config(args, root), until="prepare")
            return root
        except OutputBusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def teacher_file(args, arch: str) -> Path:
    given = dict(t.split("=", 1) for t in args.teacher)
    if arch in given:
        return Path(given[arch]).resolve()
    return args.out / "teachers" / arch / "squeeze" / f"0-{arch}.safetensors"


def train_teachers(args) -> None:
    from fadrm.stages.squeeze import squeeze

    shared = prepared(args)
    for arch in args.teacher_archs:
        path = teacher_file(args, arch)
        if path.is_file():
            print(f"teacher {arch}: {path} (exists)")
            continue
        out = args.out / "teachers" / arch
        link_stage(shared, out, "prepare")
        cfg = base_config(
            args, out, f"squeeze.teachers=[{{arch: {arch}, weights: null}}]", *TEACHER_OVERRIDES[arch], *args.set
        )  # the user's -S beats the recipe
        metrics = squeeze(cfg)
        write_json(
            out / "done.json",
            {"arch": arch, "top1": metrics["teacher_top1"], "seconds": metrics["seconds"], "device": _device_name(cfg)},
        )
        print(f"teacher {arch}: top-1 {metrics['teacher_top1']:.4f} in {metrics['seconds'] / 60:.1f} min")


def teachers_override(args, method: str) -> str:
    archs = args.teacher_archs if method == "fadrm+" else args.teacher_archs[:1]
    entries = ", ".join(f"{{arch: {a}, weights: '{teacher_file(args, a)}'}}" for a in archs)
    return f"squeeze.teachers=[{entries}]"


# ----------------------------------------------------------------------------- cells


def _variant_fields(args) -> dict[str, Any]:
    """What a variant's record carries: its name, its overrides and the cells it is compared with."""
    if not args.variant:
        return {}
    fields = {"variant": args.variant, "overrides": args.set}
    if args.baseline:
        fields["baseline"] = args.baseline
    return fields


def set_dir(args, method: str, ipc: int, seed: int) -> Path:
    root = args.out / "variants" / args.variant if args.variant else args.out
    return root / "sets" / f"{method}-ipc{ipc}-s{seed}"


def _cell_name(args, method: str, ipc: int, seed: int, *more: str) -> str:
    """How a job's progress lines name it in the grid's log, e.g. ``fadrm ipc10 s0 convnet soft``."""
    return " ".join([*([args.variant] if args.variant else []), method, f"ipc{ipc}", f"s{seed}", *more])


def make_set(args, method: str, ipc: int, seed: int) -> dict[str, Any]:
    """Select, recover and relabel one distilled set (skipped when done). A set cut off part-way (a stopped
    grid, the end of a session) is resumed, not remade: its folder is kept, the stages skip what is up to
    date for this config and recovery redoes only the batches that were not finished."""
    from fadrm.pipeline import STAGES

    out = set_dir(args, method, ipc, seed)
    if (out / "done.json").is_file():
        return read_json(out / "done.json")
    os.environ["FADRM_PROGRESS_LABEL"] = _cell_name(args, method, ipc, seed)
    link_stage(args.out / "prepared", out, "prepare")
    cfg = base_config(args, out, f"method={method}", f"ipc={ipc}", f"seed={seed}", teachers_override(args, method))
    for stage in SET_STAGES:
        STAGES[stage](cfg)
    metrics = {stage: read_json(Layout.of(cfg).metrics(stage)) for stage in SET_STAGES}
    recover = metrics["recover"]
    done = {
        "method": method,
        "ipc": ipc,
        "seed": seed,
        # each stage's own time, including work finished before an interruption that this run resumed
        "seconds": round(sum(m["seconds"] for m in metrics.values()), 1),
        "recover_s_per_image": recover.get("s_per_image"),
        "recover_psnr": recover.get("psnr_vs_init"),
        "recover_batch_seconds": recover.get("batch_seconds"),
        "teachers": metrics["squeeze"]["teachers"],
        "device": _device_name(cfg),
        "code": CODE,
    }
    write_json(out / "done.json", done)
    return done


def evaluate_set(args, method: str, ipc: int, seed: int, student: str, labels: str, parent: str | None) -> dict:
    """Train ``student`` on one set with ``labels``; the record of that evaluation."""
    from fadrm.stages.evaluate import evaluate

    src = set_dir(args, method, ipc, seed)
    out = src / f"eval-{student}-{labels}"
    if (out / "done.json").is_file():
        return read_json(out / "done.json")
    os.environ["FADRM_PROGRESS_LABEL"] = _cell_name(args, method, ipc, seed, student, labels)
    shutil.rmtree(out, ignore_errors=True)
    for stage in ("prepare", *SET_STAGES):
        link_stage(src, out, stage)
    cfg = base_config(
        args,
        out,
        f"method={method}",
        f"ipc={ipc}",
        f"seed={seed}",
        teachers_override(args, method),
        f"evaluate.student={student}",
        f"evaluate.labels={labels}",
    )
    with _cell_tracker(args, cfg, parent, _cell_name(args, method, ipc, seed, student, labels)) as tracker:
        metrics = evaluate(cfg, tracker)
    made = read_json(src / "done.json")
    record = {
        **_variant_fields(args),
        "method": method,
        "ipc": ipc,
        "seed": seed,
        "student": student,
        "labels": labels,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "best_top1": metrics["best_top1"],
        "evaluate_seconds": metrics["seconds"],
        "set_seconds": made["seconds"],
        "recover_s_per_image": made["recover_s_per_image"],
        "recover_psnr": made["recover_psnr"],
        "recover_batch_seconds": made.get("recover_batch_seconds"),  # sets made before 2026-11-28 lack it
        "teachers": made["teachers"],
        # which teacher files, not only how good: the weights behind a record can be told apart (and found)
        "teacher_sha256": read_json(Layout.of(cfg).metrics("squeeze")).get("teacher_sha256"),
        "device": _device_name(cfg),
        "set_device": made["device"],
        "epochs": cfg.evaluate.epochs,
        "torch": torch.__version__,
        "code": CODE,  # the commit (+changes) of the code that trained and tested the student
        "set_code": made.get("code"),  # and of the code that made the set (sets made before the field existed lack it)
    }
    write_json(out / "done.json", record)
    return record


def _cell_tracker(args, cfg: Config, parent: str | None, name: str):
    import contextlib

    if parent is None:
        from fadrm.tracker import NULL_TRACKER

        return contextlib.nullcontext(NULL_TRACKER)
    from fadrm.tracking import open_tracker

    @contextlib.contextmanager
    def scoped():
        tracked = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": True})})
        with open_tracker(tracked, parent_run_id=parent) as root, root.stage(name) as cell:
            cell.set_tags(
                {
                    "fadrm.kind": "benchmark-cell",
                    "fadrm.method": cfg.method,
                    "fadrm.ipc": str(cfg.ipc),
                    "fadrm.seed": str(cfg.seed),
                    "fadrm.student": cfg.evaluate.student,
                    "fadrm.variant": args.variant or "",
                }
            )
            yield cell

    return scoped()


def _device_name(cfg: Config) -> str:
    from fadrm.device import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})"


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    _exit_with_parent()
    # the workers share the grid's log: a line per job every few minutes, named after its cell
    os.environ.setdefault("FADRM_PROGRESS_INTERVAL", str(WORKER_PROGRESS_INTERVAL))


def _exit_with_parent() -> None:
    """End this worker the moment its grid process is gone (killed, timed out), instead of letting it finish its
    cell unseen and write into a folder that the next run of the grid is already remaking."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="grid-parent-watch", daemon=True).start()


def run(args) -> None:
    prepared(args)
    missing = [a for a in args.teacher_archs if not teacher_file(args, a).is_file()]
    if missing:
        raise SystemExit(f"no weights for teacher(s) {missing}: run `grid.py teachers` or pass --teacher ARCH=PATH")
    sets = [(m, ipc, s) for ipc in args.ipc for m in args.methods for s in args.seeds]
    evals = [(*cell, student, labels) for cell in sets for student in args.students for labels in args.labels]
    records = {_key(r): r for r in (json.loads(args.records.read_text()) if args.records.is_file() else [])}
    fields = ("method", "ipc", "seed", "student", "labels")
    todo = [e for e in evals if _key({"variant": args.variant, **dict(zip(fields, e))}) not in records]
    # soft labels (the protocol) before hard ones, and seed by seed, so an interrupted run has whole rows
    todo.sort(key=lambda e: (e[4] != "soft", e[2], e[1], METHODS.index(e[0]), e[3]))
    print(f"{len(evals)} evaluations, {len(evals) - len(todo)} already recorded, {len(todo)} to do", flush=True)
    client, parent = _open_parent(args) if args.track else (None, None)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    context = multiprocessing.get_context("spawn")
    pool = futures.ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker, initargs=(threads,))
    on_sigterm = signal.signal(signal.SIGTERM, raise_terminated)
    moved = None
    try:
        # The costly sets (recovery) start first; a set's evaluations go before any set not yet started,
        # so results arrive set by set instead of after every set is made.
        waiting = sorted({e[:3] for e in todo}, key=lambda c: (-SET_COST.get(c[0], 0), c[1], c[2]))
        ready: list[tuple] = []  # evaluations whose set is made
        pending: dict = {}
        while True:
            for kind, job in _next_jobs(ready, waiting, len(pending), args.workers):
                task = (make_set, args, *job) if kind == "set" else (evaluate_set, args, *job, parent)
                pending[pool.submit(*task)] = kind
            if not pending:
                break
            finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            if moved is None and (moved := checkout_moved(CODE)):
                print(moved, flush=True)
            for done in finished:
                if pending.pop(done) == "set":
                    made = done.result()
                    print(f"set {made['method']} ipc{made['ipc']} s{made['seed']}: {made['seconds']} s", flush=True)
                    cell = (made["method"], made["ipc"], made["seed"])
                    ready += [e for e in todo if e[:3] == cell]
                    continue
                record = done.result()
                records[_key(record)] = {**record, "command": args.command}
                write_json(args.records, sorted(records.values(), key=_order))
                print(f"{_key(record)}: top-1 {100 * record['top1']:.2f}%", flush=True)
    except BaseException as exc:
        _stop_workers(pool)
        if parent:
            _close_parent(client, parent, args.records, exc)
        raise
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
    pool.shutdown()
    if parent:
        client.log_artifact(parent, str(args.records))
        client.set_terminated(parent, "FINISHED")
    print(f"wrote {render(args.records, args.report, _teacher_figures(args))}")


def _stop_workers(pool: futures.ProcessPoolExecutor) -> None:
    """End the cells in progress now instead of waiting for them (a cell can take an hour): the grid is stopping."""
    pool.shutdown(wait=False, cancel_futures=True)
    workers = multiprocessing.active_children()
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout=30)


def _close_parent(client, parent: str, records: Path, exc: BaseException) -> None:
    """A grid that stops early says so in MLflow: its parent run ends KILLED (interrupted) or FAILED with the
    error, keeps the records made so far, and the runs of the cells it cut short end KILLED."""
    from fadrm.tracking import close_dead_runs, fail_run

    try:
        if records.is_file():
            client.log_artifact(parent, str(records))
        close_dead_runs(client, client.get_run(parent).info.experiment_id)
    finally:
        fail_run(client, parent, exc)


def _next_jobs(ready: list, waiting: list, running: int, workers: int) -> list[tuple[str, tuple]]:
    """What to start now to keep ``workers`` busy: evaluations of made sets first, then the next sets.
    Takes them off ``ready`` and ``waiting``."""
    jobs = []
    while running + len(jobs) < workers and (ready or waiting):
        jobs.append(("evaluation", ready.pop(0)) if ready else ("set", waiting.pop(0)))
    return jobs


def _key(r: dict) -> str:
    variant = f"{r['variant']}|" if r.get("variant") else ""
    return f"{variant}{r['method']}|ipc{r['ipc']}|s{r['seed']}|{r['student']}|{r['labels']}"


def _order(r: dict):
    method = METHODS.index(r["method"]) if r["method"] in METHODS else 99
    return (r.get("variant") or "", r["ipc"], method, r["student"], r["labels"], r["seed"])


def _teacher_figures(args) -> dict[str, dict]:
    figures = {}
    for arch in args.teacher_archs:
        card = teacher_file(args, arch).with_suffix(".json")
        if card.is_file():
            figures[arch] = {"top1": read_json(card)["top1"]}
    return figures


def _open_parent(args):
    """The MLflow client and a new parent run for this invocation of the grid."""
    from fadrm.tracking import close_dead_runs, connect, owner_tags

    client, experiment_id = connect(base_config(args, args.out))
    run = client.create_run(
        experiment_id,
        run_name=f"benchmark grid {time.strftime('%Y-%m-%d %H:%M')}",
        tags={"fadrm.kind": "benchmark", "fadrm.command": args.command[:5000], **owner_tags()},
    )
    close_dead_runs(client, experiment_id)  # a grid killed outright (SIGKILL, power) left its runs RUNNING
    return client, run.info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["teachers", "run", "docs"])
    parser.add_argument("--data", type=Path, default=DATA, help="tar(.gz) or ImageFolder of the dataset")
    parser.add_argument("--preset", default="cifar10-cpu", help="protocol preset (fadrm presets)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--records", type=Path, default=RECORDS, help="the JSON list of evaluations")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md", help="the Markdown tables")
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--students", nargs="+", default=["convnet", "resnet18"])
    parser.add_argument("--labels", nargs="+", default=["soft", "hard"], choices=["soft", "hard"])
    parser.add_argument(
        "--teacher-archs",
        nargs="+",
        default=list(TEACHER_ARCHS),
        help="teachers for fadrm+ (the first is every other method's teacher)",
    )
    parser.add_argument("--teacher", action="append", default=[], metavar="ARCH=PATH", help="use these weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-track", dest="track", action="store_false", help="no MLflow runs")
    parser.add_argument("-S", "--set", action="append", default=[], help="extra override for every cell")
    parser.add_argument(
        "--variant",
        help="name these cells' -S overrides: their sets live under OUT/variants/NAME and their records carry "
        "the name (a section of their own in docs/benchmarks.md, compared seed by seed with the plain cells)",
    )
    parser.add_argument(
        "--baseline",
        metavar="VARIANT",
        help="compare these variant cells with that variant's cells instead of the plain ones (e.g. cells of the "
        "same machine: --variant cpu-psm4 --baseline cpu)",
    )
    args = parser.parse_args()
    if args.baseline and not args.variant:
        parser.error("--baseline needs --variant: it names what a variant is compared with")
    args.command = "python benchmarks/grid.py " + shlex.join(sys.argv[1:])
    args.out = args.out.resolve()
    args.data = args.data.resolve()
    if args.what == "docs":
        print(f"wrote {render(args.records, args.report, _teacher_figures(args))}")
        return
    if not args.data.exists():
        raise SystemExit(f"no dataset at {args.data}")
    if args.what == "teachers":
        train_teachers(args)
        return
    try:
        run(args)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Terminated
        print(f"grid stopped ({exc or 'interrupted'}): the cells finished so far are in {args.records}; a rerun skips them")
        raise SystemExit(143 if isinstance(exc, Terminated) else 130) from None


if __name__ == "__main__":
    main()
