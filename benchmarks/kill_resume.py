"""Kill `fadrm run` with SIGKILL at points inside every stage, run it again, and check that the
result is byte-identical to a run that was never killed, with nothing left behind.

    python benchmarks/kill_resume.py              # the tiny preset, every kill point
    python benchmarks/kill_resume.py --only squeeze-epoch-1

For each kill point the stages before it are copied from the reference run (so only the killed
stage and those after it run), `fadrm run --local --no-track --preset tiny` is started in its own
process and killed when the point is reached (a file or folder appears), and a second `fadrm run`
finishes the job. Checked: the second run exits 0, takes over the dead run's lock, every stage
folder hashes like the reference's, no `.<stage>.tmp-*`, `.prepare-scratch-*` or partial work is
left, and a killed teacher training reports all its epochs. Writes docs/benchmarks/kill_resume.json
and prints the Markdown table of docs/faults.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "outputs" / "bench" / "kill-resume"
RESULTS = ROOT / "docs" / "benchmarks" / "kill_resume.json"
STAGES = ("prepare", "squeeze", "select", "recover", "relabel", "evaluate")

# name -> (stage it interrupts, glob under out_dir whose appearance triggers the kill, how many must exist)
POINTS: dict[str, tuple[str, str, int]] = {
    "prepare-scratch": ("prepare", ".prepare-scratch-*/*", 1),
    "prepare-publishing": ("prepare", ".prepare.tmp-*/files.tsv", 1),
    "squeeze-epoch-1": ("squeeze", ".squeeze.partial/0-convnet.ckpt", 1),
    "squeeze-last-epoch": ("squeeze", ".squeeze.tmp-*/0-convnet.safetensors", 1),
    "select-writing": ("select", ".select.tmp-*/images/0003", 1),
    "recover-batch-1": ("recover", ".recover.partial/*/batch-00000.pt", 1),
    "recover-publishing": ("recover", ".recover.tmp-*/images/0009", 1),
    "relabel-writing": ("relabel", ".relabel.tmp-*", 1),
    "evaluate-training": ("evaluate", ".evaluate.tmp-*", 1),
    "evaluate-publishing": ("evaluate", ".evaluate.tmp-*/student.safetensors", 1),
    "summary": ("evaluate", "evaluate/stage.json", 1),
}


def fadrm_run(out: Path) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "fadrm"
    return subprocess.Popen(
        [str(exe), "run", "--local", "--no-track", "--preset", "tiny", "-S", f"out_dir={out}"],
        cwd=WORK,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "FADRM_PROGRESS": "0"},
    )


def hashes(out: Path) -> dict[str, str]:
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for stage in STAGES
        for p in sorted((out / stage).rglob("*"))
        if p.is_file()
    }


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".fadrm")


def reference() -> Path:
    ref = WORK / "reference"
    if not (ref / "evaluate" / "stage.json").is_file():
        shutil.rmtree(ref, ignore_errors=True)
        proc = fadrm_run(ref)
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"reference run failed:\n{out}")
    return ref


def kill_point(name: str, ref: Path) -> dict:
    stage, pattern, count = POINTS[name]
    out = WORK / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for earlier in STAGES[: STAGES.index(stage)]:  # earlier stages done: only the killed one and later run
        shutil.copytree(ref / earlier, out / earlier)
    victim = fadrm_run(out)
    start = time.time()
    while len(list(out.glob(pattern))) < count:
        if victim.poll() is not None:
            return {"point": name, "stage": stage, "killed": False, "note": "finished before the point"}
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    left = leftovers(out)
    resumed = fadrm_run(out)
    log, _ = resumed.communicate()
    same = hashes(out) == hashes(ref)
    squeeze_epochs = None
    if (out / "plots" / "squeeze_loss.json").is_file():
        squeeze_epochs = len(json.loads((out / "plots" / "squeeze_loss.json").read_text()))
    return {
        "point": name,
        "stage": stage,
        "killed": True,
        "killed_after_s": round(time.time() - start, 1),
        "left_by_kill": left,
        "resume_exit": resumed.returncode,
        "took_over": "took over from pid" in log,
        "left_after_resume": leftovers(out),
        "identical_to_reference": same,
        "squeeze_epochs_reported": squeeze_epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=list(POINTS))
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    ref = reference()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.only:
        results[name] = kill_point(name, ref)
        print(json.dumps(results[name]), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = [
        "| kill point | left by the kill | resume | took over the lock | left after resume | "
        "stage folders identical to an unkilled run |",
        "|---|---|---|---|---|---|",
    ]
    for name in POINTS:
        r = results.get(name)
        if r is None:
            continue
        if not r["killed"]:
            lines.append(f"| {name} | ({r['note']}) | | | | |")
            continue
        lines.append(
            f"| {name} | {', '.join(r['left_by_kill']) or '-'} | exit {r['resume_exit']} | "
            f"{'yes' if r['took_over'] else 'no'} | {', '.join(r['left_after_resume']) or 'nothing'} | "
            f"{'yes' if r['identical_to_reference'] else '**no**'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
