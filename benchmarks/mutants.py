"""Which test catches which break of the method: a targeted mutation run of the test suite.

    python benchmarks/mutants.py                 # every mutant (several minutes on 2 cores)
    python benchmarks/mutants.py merge-skipped   # some of them
    python benchmarks/mutants.py --list

Each mutant is one textual edit of the package (the kind of slip a refactor makes: a merge
dropped at its call site, a constant changed, a term left out). For each, a copy of the
project gets the edit and the test modules that guard that part run against it; the mutant
is *caught* when at least one test fails. Writes docs/benchmarks/mutants.json and the table
in docs/mutants.md. A mutant that survives is a test to write.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RECOVER_TESTS = ("tests/test_recover.py", "tests/test_method.py")
REPLAY_TESTS = ("tests/test_replay.py", "tests/test_pipeline.py")
STUDENT_TESTS = ("tests/test_evaluate.py", "tests/test_replay.py")


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str  # the break, as a user would name it
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "merge-skipped",
        "residual merge skipped where recovery calls it",
        "fadrm/stages/recover.py",
        "residual_merge(x, anchor, alphas[k], nxt) if merges else resize(x, nxt)",
        "resize(x, nxt)",
        RECOVER_TESTS,
    ),
    Mutant(
        "merge-alpha-ignored",
        "residual merge with a fixed 0.5 instead of recover.alpha",
        "fadrm/stages/recover.py",
        "residual_merge(x, anchor, alphas[k], nxt)",
        "residual_merge(x, anchor, 0.5, nxt)",
        RECOVER_TESTS,
    ),
    Mutant(
        "merge-alpha-schedule-first",
        "an alpha schedule's first weight used at every merge",
        "fadrm/stages/recover.py",
        "residual_merge(x, anchor, alphas[k], nxt)",
        "residual_merge(x, anchor, alphas[0], nxt)",
        RECOVER_TESTS,
    ),
    Mutant(
        "merge-formula",
        "residual merge weights swapped (1 - alpha on the optimised image)",
        "fadrm/stages/recover.py",
        "return alpha * resize(x, size) + (1 - alpha) * resize(init, size)",
        "return (1 - alpha) * resize(x, size) + alpha * resize(init, size)",
        RECOVER_TESTS,
    ),
    Mutant(
        "adam-betas",
        "recovery's Adam betas (0.9, 0.999) instead of (0.5, 0.9)",
        "fadrm/stages/recover.py",
        "torch.optim.Adam([x], lr=rc.lr, betas=(0.5, 0.9))",
        "torch.optim.Adam([x], lr=rc.lr, betas=(0.9, 0.999))",
        RECOVER_TESTS,
    ),
    Mutant(
        "adam-shared",
        "one Adam for all stages instead of a fresh one per stage",
        "fadrm/stages/recover.py",
        "    for k, (res, iters) in enumerate(schedule):\n        optimizer = torch.optim.Adam([x], lr=rc.lr, betas=(0.5, 0.9))\n",
        "    optimizer = torch.optim.Adam([x], lr=rc.lr, betas=(0.5, 0.9))\n    for k, (res, iters) in enumerate(schedule):\n"
        "        optimizer.param_groups[0]['params'] = [x]\n",
        RECOVER_TESTS,
    ),
    Mutant(
        "lr-constant",
        "recovery step size constant instead of the cosine",
        "fadrm/stages/recover.py",
        'group["lr"] = cosine_lr(step, total, rc.lr)',
        'group["lr"] = rc.lr',
        RECOVER_TESTS,
    ),
    Mutant(
        "lr-per-stage",
        "cosine restarted in every stage instead of over all steps",
        "fadrm/stages/recover.py",
        'group["lr"] = cosine_lr(step, total, rc.lr)',
        'group["lr"] = cosine_lr(step % iters, iters, rc.lr)',
        RECOVER_TESTS,
    ),
    Mutant(
        "resolution-ignored-views",
        "views at the final resolution in every stage",
        "fadrm/stages/recover.py",
        "view = recovery_view(x, res, crop_scale, jitter_limit, rng)",
        "view = recovery_view(x, schedule[-1][0], crop_scale, jitter_limit, rng)",
        RECOVER_TESTS,
    ),
    Mutant(
        "resolution-ignored-stage",
        "the stage collapses the schedule to one resolution",
        "fadrm/stages/recover.py",
        "self.schedule = resolve_schedule(self.rc, data.resolution, self.spec)\n",
        "self.schedule = ((data.resolution, sum(i for _, i in resolve_schedule(self.rc, data.resolution, self.spec))),)\n",
        RECOVER_TESTS,
    ),
    Mutant(
        "bn-dropped",
        "BN-statistics term dropped from the recovery loss",
        "fadrm/stages/recover.py",
        "loss = rc.ce_weight * ce + (rc.bn_weight * bn if bn is not None else 0.0)",
        "loss = rc.ce_weight * ce",
        RECOVER_TESTS,
    ),
    Mutant(
        "bn-first-weight-formula",
        "first BN layer's weight ignored in the loss",
        "fadrm/losses.py",
        "return self.first_weight * terms[0] + sum(",
        "return terms[0] + sum(",
        RECOVER_TESTS,
    ),
    Mutant(
        "bn-first-weight-stage",
        "first BN layer's weight not passed by the stage",
        "fadrm/stages/recover.py",
        "BNStatsLoss(model, self.rc.first_bn_weight)",
        "BNStatsLoss(model)",
        RECOVER_TESTS,
    ),
    Mutant(
        "ce-dropped",
        "CE term dropped from the recovery loss",
        "fadrm/stages/recover.py",
        "loss = rc.ce_weight * ce + (rc.bn_weight * bn if bn is not None else 0.0)",
        "loss = rc.bn_weight * bn if bn is not None else 0.0 * ce",
        RECOVER_TESTS,
    ),
    Mutant(
        "clamp-dropped",
        "images not clamped to the valid pixel range",
        "fadrm/stages/recover.py",
        "x.copy_(torch.maximum(torch.minimum(x, high), low))",
        "pass",
        RECOVER_TESTS,
    ),
    Mutant(
        "teacher-fixed",
        "always the first teacher instead of round-robin",
        "fadrm/stages/recover.py",
        "teacher = teachers[teacher_for_step(step, len(teachers))]",
        "teacher = teachers[0]",
        RECOVER_TESTS,
    ),
    Mutant(
        "replay-next-epoch",
        "evaluate replays the next epoch's views",
        "fadrm/stages/evaluate.py",
        "views = soft.views(epoch)",
        "views = soft.views(epoch + 1)",
        REPLAY_TESTS,
    ),
    Mutant(
        "replay-flip-dropped",
        "views rendered without their flips",
        "fadrm/augment.py",
        "out, torch.from_numpy(views.flip[pos]))",
        "out)",
        REPLAY_TESTS,
    ),
    Mutant(
        "replay-cutmix-box",
        "CutMix box read transposed (left/top swapped)",
        "fadrm/augment.py",
        "    mix = views.mix[positions]\n",
        "    mix = views.mix[positions][:, [1, 0, 3, 2]]\n",
        REPLAY_TESTS,
    ),
    Mutant(
        "replay-crop-box",
        "crop box read as (left, top) instead of (top, left)",
        "fadrm/augment.py",
        "torch.from_numpy(views.box[pos]), out",
        "torch.from_numpy(views.box[pos][:, [1, 0, 3, 2]]), out",
        REPLAY_TESTS,
    ),
    Mutant(
        "stored-epoch-off",
        "stored labels returned for the wrong epoch",
        "fadrm/stages/relabel.py",
        "e, lo, hi = epoch % self.epochs,",
        "e, lo, hi = (epoch + 1) % self.epochs,",
        REPLAY_TESTS,
    ),
    Mutant(
        "hard-labels",
        "evaluation trains on hard labels although soft ones were asked for",
        "fadrm/stages/evaluate.py",
        'if ev.labels == "soft":',
        "if False:",
        STUDENT_TESTS,
    ),
    Mutant(
        "student-lr-constant",
        "student step size constant instead of the cosine",
        "fadrm/stages/evaluate.py",
        "lambda s: warmup_cosine(s, total, 0, ev.final_lr_fraction)",
        "lambda s: 1.0",
        STUDENT_TESTS,
    ),
    Mutant(
        "student-lr-per-epoch",
        "student cosine stepped per epoch instead of per step",
        "fadrm/stages/evaluate.py",
        "lambda s: warmup_cosine(s, total, 0, ev.final_lr_fraction)",
        "lambda s: warmup_cosine(s // steps_per_epoch * steps_per_epoch, total, 0, ev.final_lr_fraction)",
        STUDENT_TESTS,
    ),
    Mutant(
        "decay-on-1d-rule",
        "weight decay on 1-D parameters too (engine rule)",
        "fadrm/engine.py",
        "(decay if param.ndim > 1 else no_decay)",
        "(decay if param.ndim >= 1 else no_decay)",
        STUDENT_TESTS,
    ),
    Mutant(
        "decay-on-1d-stage",
        "student optimiser built without the parameter groups",
        "fadrm/stages/evaluate.py",
        "torch.optim.AdamW(param_groups(student, ev.weight_decay), lr=ev.lr)",
        "torch.optim.AdamW(student.parameters(), lr=ev.lr, weight_decay=ev.weight_decay)",
        STUDENT_TESTS,
    ),
]


def apply(tree: Path, mutant: Mutant) -> None:
    path = tree / mutant.file
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"{mutant.name}: expected the original text once in {mutant.file}, found it {count} times")
    path.write_text(text.replace(mutant.old, mutant.new))


def run_tests(tree: Path, tests: tuple[str, ...], timeout: int) -> tuple[bool, list[str], float]:
    """(caught, failing test ids, seconds) for the project copy in ``tree``."""
    env = {**os.environ, "FADRM_PROGRESS": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return True, ["(timed out)"], time.perf_counter() - start
    output = proc.stdout + proc.stderr
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)))
    return proc.returncode != 0, failed, time.perf_counter() - start


def copy_project(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", ".venv", "outputs", ".git", "mlflow.db", "*.egg-info")
    for item in ("fadrm", "flows", "tests", "benchmarks", "pyproject.toml", "params.yaml", "dvc.yaml"):
        src = ROOT / item
        (shutil.copytree(src, dest / item, ignore=ignore) if src.is_dir() else shutil.copy(src, dest / item))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args()
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:28} {m.what}")
        return
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    results_file = DOCS / "benchmarks" / "mutants.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="fadrm-mutants-") as tmp:
        clean = copy_project(Path(tmp) / "clean")
        # control: the unmutated copy must pass every test group used, or a red test would prove nothing
        controls = {}
        for tests in dict.fromkeys(m.tests for m in chosen):
            red, failed, seconds = run_tests(clean, tests, args.timeout)
            if red:
                raise SystemExit(f"the unmutated project fails {', '.join(tests)}: {', '.join(failed[:5])}")
            controls[" ".join(tests)] = round(seconds, 1)
            print(f"control  {' '.join(tests):60} passes unmutated ({seconds:.0f} s)", flush=True)
        results["_control"] = {"passed_unmutated": controls}
        for mutant in chosen:
            tree = Path(tmp) / mutant.name
            shutil.copytree(clean, tree)
            apply(tree, mutant)
            caught, failed, seconds = run_tests(tree, mutant.tests, args.timeout)
            results[mutant.name] = {
                "what": mutant.what,
                "file": mutant.file,
                "caught": caught,
                "failed_tests": failed,
                "tests_run": list(mutant.tests),
                "seconds": round(seconds, 1),
            }
            print(f"{'caught  ' if caught else 'SURVIVED'} {mutant.name:28} {', '.join(failed[:3])}", flush=True)
            shutil.rmtree(tree)
            results_file.parent.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(results, indent=2) + "\n")
    render(results)


def render(results: dict) -> None:
    order = [m.name for m in MUTANTS if m.name in results]
    caught = sum(results[n]["caught"] for n in order)
    control = results.get("_control", {}).get("passed_unmutated", {})
    lines = [
        "# Mutants: which test catches which break of the method",
        "",
        "Written by `python benchmarks/mutants.py`: each row is one edit of the package, the test modules "
        "that guard that part are run against it, and the tests that went red are listed.",
        "",
        f"Caught: {caught} of {len(order)}. Control: the same test groups pass on the unmutated copy "
        f"({'; '.join(f'`{t}`' for t in control) or 'not recorded'}).",
        "",
        "| mutant | the break | file | caught | tests that failed |",
        "|---|---|---|---|---|",
    ]
    for name in order:
        r = results[name]
        tests = "<br>".join(f"`{t.split('::', 1)[-1]}`" for t in r["failed_tests"]) or "-"
        lines.append(f"| {name} | {r['what']} | `{r['file']}` | {'yes' if r['caught'] else '**no**'} | {tests} |")
    (DOCS / "mutants.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {DOCS / 'mutants.md'}")


if __name__ == "__main__":
    main()
