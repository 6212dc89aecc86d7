"""The benchmark report's arithmetic: mean ± std over seeds and DD-Ranking's scores."""

import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from grid_report import lrs, render, summarise  # noqa: E402

from .conftest import proc_stat  # noqa: E402


def test_label_robust_score_follows_dd_ranking():
    # a = 0.5 IOR - 0.5 HLR; LRS = (e^a - 1/e) / (e - 1/e): 0 at a = -1, 1 at a = 1
    assert lrs(0.0, 0.0) == pytest.approx((1 - math.exp(-1)) / (math.e - math.exp(-1)))
    assert lrs(1.0, -1.0) == pytest.approx(1.0)
    assert lrs(-1.0, 1.0) == pytest.approx(0.0)
    assert lrs(0.10, 0.30) < lrs(0.10, 0.20) < lrs(0.20, 0.20)


def _records():
    rows = []
    for seed, (rand, fadrm, hard) in enumerate([(0.50, 0.56, 0.40), (0.52, 0.58, 0.44)]):
        rows += [
            {"method": "random", "ipc": 10, "seed": seed, "student": "convnet", "labels": "soft", "top1": rand},
            {"method": "fadrm", "ipc": 10, "seed": seed, "student": "convnet", "labels": "soft", "top1": fadrm},
            {"method": "fadrm", "ipc": 10, "seed": seed, "student": "convnet", "labels": "hard", "top1": hard},
        ]
    return rows


def test_summary_per_cell():
    rows = summarise(_records(), {"convnet": {"top1": 0.82}})
    fadrm = rows[(10, "fadrm", "convnet")]
    assert fadrm["ior"] == pytest.approx(0.57 - 0.51)
    assert fadrm["hlr"] == pytest.approx(0.82 - 0.42)
    assert fadrm["lrs"] == pytest.approx(lrs(0.06, 0.40))
    assert "hlr" not in rows[(10, "random", "convnet")]  # no hard-label runs of random here


def test_report_shows_mean_std_and_n(tmp_path):
    import json

    path = tmp_path / "records.json"
    path.write_text(json.dumps([{**r, "device": "cpu", "command": "python benchmarks/grid.py run"} for r in _records()]))
    text = render(path, tmp_path / "benchmarks.md", {"convnet": {"top1": 0.82}}).read_text()
    assert "| fadrm | 57.00 ± 1.41 (n=2) | 42.00 ± 2.83 (n=2) | 48.2 | cpu |" in text
    assert "python benchmarks/grid.py run" in text and "IOR" in text
    # one seed has no spread to show: not "± 0.00"
    path.write_text(json.dumps([{**r, "device": "cpu", "command": "c"} for r in _records() if r["seed"] == 0]))
    text = render(path, tmp_path / "benchmarks.md", {"convnet": {"top1": 0.82}}).read_text()
    assert "| fadrm | 56.00 (n=1, no spread yet) | 40.00 (n=1, no spread yet) | 48.2 | cpu |" in text


def test_figure_plots_top1_and_the_gain_over_random_of_the_same_seed():
    from grid_report import accuracy_series

    records = _records() + [
        # a third FADRM seed without its random images: in the top-1 series, not in the paired gain
        {"method": "fadrm", "ipc": 10, "seed": 2, "student": "convnet", "labels": "soft", "top1": 0.70},
        {"method": "fadrm", "ipc": 10, "seed": 0, "student": "convnet", "labels": "soft", "top1": 0.10, "variant": "v"},
        {"method": "fadrm", "ipc": 50, "seed": 0, "student": "convnet", "labels": "soft", "top1": 0.10, "variant": "v"},
    ]
    series = accuracy_series(records)
    fadrm = series["convnet"]["fadrm"][10]
    assert fadrm["top1"] == pytest.approx([56.0, 58.0, 70.0])  # soft labels only, no variant, in points
    assert fadrm["gain"] == pytest.approx([6.0, 6.0])  # seed by seed against random's 50 and 52
    assert series["convnet"]["random"][10] == {"top1": pytest.approx([50.0, 52.0]), "gain": []}
    assert set(series["convnet"]["fadrm"]) == {10}  # a variant's cells are not the method's


def test_report_shows_the_figure(tmp_path):
    import json

    from PIL import Image

    (tmp_path / "docs").mkdir()
    path = tmp_path / "records.json"
    path.write_text(json.dumps([]))
    assert "![" not in render(path, tmp_path / "docs" / "benchmarks.md", {}).read_text()  # nothing to plot yet
    path.write_text(json.dumps(_records()))
    text = render(path, tmp_path / "docs" / "benchmarks.md", {}).read_text()
    figure = tmp_path / "records.png"
    assert "](../records.png)" in text  # linked relative to the page
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 400
    first = figure.read_bytes()
    render(path, tmp_path / "docs" / "benchmarks.md", {})
    assert figure.read_bytes() == first  # the same records, the same picture


def test_report_names_the_machines_of_each_row(tmp_path):
    import json

    records = [{**r, "device": "cpu x2" if r["seed"] else "NVIDIA H200"} for r in _records()]
    records.append({**records[0], "method": "fadrm+", "device": "cpu x2"})
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    text = render(path, tmp_path / "benchmarks.md", {}).read_text()
    assert "| 48.2 | NVIDIA H200, cpu x2 |" in next(x for x in text.splitlines() if x.startswith("| fadrm |"))
    assert next(x for x in text.splitlines() if x.startswith("| fadrm+ |")).endswith("| 55.9 | cpu x2 |")
    assert "- Code" not in text  # no record names its code


def test_report_names_the_code_of_the_records_that_have_it(tmp_path):
    import json

    commit = "0123456789abcdef0123456789abcdef01234567"
    records = _records()
    records[0] = {**records[0], "code": commit, "set_code": commit + "+changes"}
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    text = render(path, tmp_path / "benchmarks.md", {}).read_text()
    line = next(x for x in text.splitlines() if x.startswith("- Code"))
    assert line.endswith(f": 0123456789ab, 0123456789ab+changes; {len(records) - 1} records made before the field existed name none.")


def test_over_random_is_paired_by_seed():
    # random has a third seed that fadrm lacks: it must not enter fadrm's IOR
    extra = {"method": "random", "ipc": 10, "seed": 2, "student": "convnet", "labels": "soft", "top1": 0.10}
    rows = summarise([*_records(), extra], {})
    assert rows[(10, "fadrm", "convnet")]["ior"] == pytest.approx(0.06)
    assert rows[(10, "fadrm", "convnet")]["ior_n"] == 2


def test_variants_are_their_own_rows_paired_with_the_plain_cells(tmp_path):
    import json

    variant = [
        {**r, "variant": "step-0.05", "overrides": ["recover.lr=0.05"], "top1": r["top1"] + 0.01 * (1 + r["seed"])}
        for r in _records()
        if r["method"] == "fadrm" and r["labels"] == "soft"
    ]
    rows = summarise([*_records(), *variant], {})
    assert rows[(10, "fadrm", "convnet")]["soft"] == [0.56, 0.58]  # the variant is not mixed into the plain cell
    path = tmp_path / "records.json"
    path.write_text(json.dumps([*_records(), *variant]))
    (tmp_path / "records.notes.md").write_text("What the figures say.\n")
    text = render(path, tmp_path / "benchmarks.md", {}).read_text()
    line = next(x for x in text.splitlines() if x.startswith("| step-0.05 |"))
    assert "| 58.50 ± 2.12 (n=2) | plain | 57.00 ± 1.41 (n=2) | +1.50 ± 0.71 (n=2) | `recover.lr=0.05` |" in line
    assert "What the figures say." in text


def test_a_variant_is_compared_with_the_baseline_it_names(tmp_path):
    import json

    def cells(variant, offset, **extra):
        return [
            {**r, "variant": variant, "top1": r["top1"] + offset + 0.01 * r["seed"], **extra}
            for r in _records()
            if r["method"] == "fadrm" and r["labels"] == "soft"
        ]

    records = [*_records(), *cells("cpu", -0.02, overrides=[]), *cells("psm4", 0.0, overrides=["x=1"], baseline="cpu")]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    text = render(path, tmp_path / "benchmarks.md", {}).read_text()
    line = next(x for x in text.splitlines() if x.startswith("| psm4 |"))
    # psm4 (56, 59) against cpu (54, 57): +2 on both seeds (against the plain cells, 56 and 58: +0.5 ± 0.71)
    assert "| cpu | 55.50 ± 2.12 (n=2) | +2.00 ± 0.00 (n=2) | `x=1` |" in line


def test_a_variant_with_another_teacher_names_it(tmp_path):
    import json

    def cells(variant, sha, top1, **extra):
        return [
            {**r, "variant": variant, "overrides": [], "teachers": {"0-convnet": top1}, "teacher_sha256": {"0-convnet": sha}, **extra}
            for r in _records()
            if r["labels"] == "soft"
        ]

    records = [
        *cells("teacher2", "aa", 0.8185),
        *cells("weaker", "bb", 0.7862, baseline="teacher2"),
        *cells("crop", "aa", 0.8183, baseline="teacher2", overrides=["select.crop_scale=[1.0,1.0]"]),  # re-measured
    ]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    lines = render(path, tmp_path / "benchmarks.md", {}).read_text().splitlines()
    row = {x.split("|")[1].strip(): x for x in lines if x.startswith("| ") and "| 10 | fadrm |" in x}
    assert row["weaker"].endswith("| teacher convnet 78.62% |")
    assert row["crop"].endswith("| `select.crop_scale=[1.0,1.0]` |")  # the same file (sha256): no teacher named
    assert row["teacher2"].endswith("| none |")  # no baseline records: nothing to differ from


def test_a_fadrm_plus_row_names_every_teacher_that_differs(tmp_path):
    """A FADRM+ row compares all of its teachers: the same first teacher with another second one is a change."""
    import json

    def cells(variant, teachers, method, **extra):
        tops = {f"{i}-{arch}": top1 for i, (arch, _, top1) in enumerate(teachers)}
        shas = {f"{i}-{arch}": sha for i, (arch, sha, _) in enumerate(teachers)}
        rows = [r for r in _records() if r["labels"] == "soft" and r["method"] == "fadrm"]
        return [
            {**r, "method": method, "variant": variant, "overrides": [], "teachers": tops, "teacher_sha256": shas, **extra}
            for r in rows
        ]

    convnet, resnet20, resnet18 = ("convnet", "aa", 0.8207), ("resnet20", "cc", 0.8507), ("resnet18", "dd", 0.8562)
    records = [
        *cells("base", [convnet], "fadrm"),
        *cells("base", [convnet, resnet20], "fadrm+"),
        *cells("other-second", [convnet], "fadrm", baseline="base"),
        *cells("other-second", [convnet, resnet18], "fadrm+", baseline="base"),
    ]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    lines = render(path, tmp_path / "benchmarks.md", {}).read_text().splitlines()
    rows = {x.split("|")[3].strip(): x for x in lines if x.startswith("| other-second |")}
    assert rows["fadrm"].endswith("| none |")  # every other method kept its teacher
    assert rows["fadrm+"].endswith("| teachers convnet 82.07%, resnet18 85.62% |")


def test_teacher_line_names_the_figures_one_teacher_got_on_other_machines(tmp_path):
    """One teacher file measured on a GPU (bf16) and on CPUs (fp32) gets two top-1s a few hundredths apart: the
    header gives the one most cells carry and names the other with its machine; another file is not one of them."""
    import json

    def cell(seed, top1, sha, device):
        return {**_records()[0], "seed": seed, "device": device, "teachers": {"0-convnet": top1}, "teacher_sha256": {"0-convnet": sha}}

    records = [cell(0, 0.7862, "aa", "H200"), cell(1, 0.7862, "aa", "H200"), cell(2, 0.7871, "aa", "cpu x2")]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records + [cell(3, 0.7000, "bb", "cpu x2")]))
    text = render(path, tmp_path / "benchmarks.md", {}).read_text()
    assert "`fadrm squeeze`): ConvNet-64 78.62% (measured again: 78.71% on cpu x2)." in text


def test_hard_label_recovery_takes_the_best_full_data_teacher(tmp_path):
    """The plain cells' teacher is cut short on purpose (the preset's 6 epochs): HLR measures against the
    best teacher of the student's architecture in the records, and the header names both."""
    import json

    plain = [{**r, "teachers": {"0-convnet": 0.7862}} for r in _records()]
    stronger = [{**r, "variant": "teacher1", "overrides": [], "teachers": {"0-convnet": 0.8207}} for r in _records()]
    path = tmp_path / "records.json"
    path.write_text(json.dumps([*plain, *stronger]))
    text = render(path, tmp_path / "benchmarks.md", {}).read_text()
    assert "Teachers (full training split, hard labels with smoothing 0.1, `fadrm squeeze`): ConvNet-64 78.62%." in text
    assert "the whole training split, ConvNet-64 82.07%." in text
    ddr = next(x for x in text.splitlines() if x.startswith("| fadrm | +"))
    assert ddr.startswith("| fadrm | +6.00 | 40.07 |")  # 82.07 - 42.00, not 78.62 - 42.00
    # without hard-label cells there is no HLR, and no full-data reference to name
    path.write_text(json.dumps([r for r in plain if r["labels"] == "soft"]))
    assert "Full-data accuracy" not in render(path, tmp_path / "benchmarks.md", {}).read_text()


def test_grid_evaluates_a_made_set_before_making_the_next():
    """With one worker, a set's evaluations run before the next set is made: results arrive set by set,
    not after every set of a long grid (an IPC 50 set takes over an hour on 2 CPU cores)."""
    from grid import _next_jobs

    ready, waiting = [], [("fadrm", 10, 0), ("fadrm", 10, 1)]
    assert _next_jobs(ready, waiting, running=0, workers=1) == [("set", ("fadrm", 10, 0))]
    assert _next_jobs(ready, waiting, running=1, workers=1) == []  # the worker is busy
    ready += [("fadrm", 10, 0, "convnet", "soft"), ("fadrm", 10, 0, "convnet", "hard")]
    assert _next_jobs(ready, waiting, running=0, workers=1) == [("evaluation", ("fadrm", 10, 0, "convnet", "soft"))]
    assert _next_jobs(ready, waiting, running=0, workers=3) == [
        ("evaluation", ("fadrm", 10, 0, "convnet", "hard")),
        ("set", ("fadrm", 10, 1)),
    ]
    assert ready == [] and waiting == []


def _process_state(pid: int) -> str | None:
    """The state letter of a Linux process (R, S, Z, ...), None once it is gone."""
    fields = proc_stat(pid)
    return fields[0] if fields else None


GRID_POOL = """
import multiprocessing, os, sys, time
from concurrent import futures
sys.path.insert(0, sys.argv[1])
import grid

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(1, mp_context=context, initializer=grid._init_worker, initargs=(1,)) as pool:
        worker = pool.submit(os.getpid).result()
        cell = pool.submit(time.sleep, 600)  # a long cell
        while not cell.running():
            time.sleep(0.01)
        print(worker, flush=True)
        cell.result()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_grid_workers_stop_when_the_grid_is_killed(tmp_path):
    """A grid killed mid-cell (kill, `timeout`, a scheduler) takes its workers with it: none goes on training
    unseen and writing into a cell folder that the next run of the grid is already remaking."""
    import signal
    import subprocess
    import time

    script = tmp_path / "pool.py"
    script.write_text(GRID_POOL)
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    with (tmp_path / "pool.log").open("w") as log:  # the killed grid's resource tracker complains there
        grid = subprocess.Popen([sys.executable, str(script), str(benchmarks)], stdout=subprocess.PIPE, stderr=log, text=True)
    worker = None
    try:
        worker = int(grid.stdout.readline())
        assert _process_state(worker) not in (None, "Z")  # busy with its long cell
        grid.send_signal(signal.SIGKILL)  # no clean shutdown: the worker is orphaned
        grid.wait()
        deadline = time.monotonic() + 60
        while _process_state(worker) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _process_state(worker) in (None, "Z"), "the worker outlived its grid"
    finally:
        grid.kill()
        grid.stdout.close()
        if worker and _process_state(worker) not in (None, "Z"):
            os.kill(worker, signal.SIGKILL)


def _toy_grid(tmp_path: Path) -> list[str]:
    """The grid's arguments for one toy cell on the built-in subset."""
    return [
        *("--preset tiny --data fadrm/assets/cifar10-mini.tar.gz --teacher-archs convnet".split()),
        *("--ipc 1 --seeds 0 --students convnet --labels soft --methods fadrm".split()),
        *("-S squeeze.epochs=1 -S relabel.epochs=2 -S recover.iterations=2".split()),
        *("--out", str(tmp_path / "grid"), "--records", str(tmp_path / "records.json"), "--report", str(tmp_path / "b.md")),
    ]


@pytest.mark.slow
def test_a_grid_stopped_mid_cell_closes_its_mlflow_runs(tmp_path):
    """SIGTERM (`timeout`, a scheduler, `kill`) while a cell trains: the grid stops at once instead of finishing
    its cells, and MLflow shows what happened: the parent run KILLED with the reason, the cut-short cell KILLED,
    nothing left RUNNING."""
    import signal
    import subprocess
    import time

    from mlflow import MlflowClient

    root = Path(__file__).resolve().parents[1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "FADRM_PROGRESS": "0"}
    args = _toy_grid(tmp_path)
    made = subprocess.run([sys.executable, "benchmarks/grid.py", "teachers", *args, "--no-track"], cwd=root, env=env)
    assert made.returncode == 0
    client = MlflowClient(uri)
    client.search_experiments()  # the store's tables exist before two processes use it
    # a student that would train for hours
    long = [*args, "-S", "evaluate.epochs=100000"]
    grid = subprocess.Popen(
        [sys.executable, "benchmarks/grid.py", "run", *long],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        cell = None
        deadline = time.monotonic() + 300
        while cell is None and time.monotonic() < deadline and grid.poll() is None:
            time.sleep(1)
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(experiments, "tags.`fadrm.kind` = 'benchmark-cell'") if experiments else []
            cell = runs[0] if runs else None
        assert cell is not None and cell.info.status == "RUNNING", grid.stdout.read() if grid.poll() is not None else "no cell started"
        time.sleep(2)  # into its training
        grid.send_signal(signal.SIGTERM)
        out, _ = grid.communicate(timeout=120)  # not the hours the cell would take
    finally:
        grid.kill()
    assert grid.returncode == 143, out[-2000:]
    assert "grid stopped (stopped by signal SIGTERM)" in out
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, "tags.`fadrm.kind` = 'benchmark'")
    assert parent.info.status == "KILLED"
    assert "SIGTERM" in parent.data.tags["fadrm.error"]
    assert client.get_run(cell.info.run_id).info.status == "KILLED"
    assert not client.search_runs(experiments, "attributes.status = 'RUNNING'")


@pytest.mark.slow
def test_a_grid_stopped_during_recovery_resumes_the_set_on_the_next_run(tmp_path):
    """An IPC 50 set takes an hour or more on CPUs: a grid stopped during its recovery must not start the set
    over on its next run; the recovery batches finished before the stop are kept and counted."""
    import json
    import signal
    import subprocess
    import time

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FADRM_PROGRESS": "0"}
    args = [*_toy_grid(tmp_path), "--no-track", "-S", "recover.batch_size=2", "-S", "recover.iterations=60"]
    assert subprocess.run([sys.executable, "benchmarks/grid.py", "teachers", *args], cwd=root, env=env).returncode == 0
    partial = tmp_path / "grid" / "sets" / "fadrm-ipc1-s0" / ".recover.partial"
    command = [sys.executable, "benchmarks/grid.py", "run", *args]
    grid = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(partial.glob("*/batch-*.pt")) and time.monotonic() < deadline and grid.poll() is None:
            time.sleep(0.2)
        grid.send_signal(signal.SIGTERM)
        out, _ = grid.communicate(timeout=120)
    finally:
        grid.kill()
    assert grid.returncode == 143, out[-2000:]
    kept = sorted(p.name for p in partial.glob("*/batch-*.pt"))
    assert kept and len(kept) < 5, kept  # stopped part-way: some of the 5 batches finished, not all

    again = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    recover = json.loads((tmp_path / "grid" / "sets" / "fadrm-ipc1-s0" / "metrics" / "recover.json").read_text())
    assert recover["resumed_seconds"] > 0  # the kept batches were used, not remade
    assert len(recover["batch_seconds"]) == 5 and all(s > 0 for s in recover["batch_seconds"])
    (record,) = json.loads((tmp_path / "records.json").read_text())
    assert record["set_seconds"] >= recover["seconds"] >= sum(recover["batch_seconds"]) - 0.1


def test_the_next_grid_closes_the_runs_of_one_killed_outright(tmp_path, monkeypatch):
    """A grid killed with SIGKILL cannot close its parent run: the next grid on this host marks it KILLED."""
    import argparse
    import subprocess

    from grid import _open_parent
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = argparse.Namespace(preset="tiny", out=str(tmp_path), data=str(tmp_path), device="cpu", set=[], command="grid.py run")
    root = Path(__file__).resolve().parents[1]
    opens_and_dies = (
        "import argparse, os, sys; sys.path.insert(0, 'benchmarks'); from grid import _open_parent; "
        f"_, run = _open_parent(argparse.Namespace(**{vars(args)!r})); print(run, flush=True); os._exit(9)"
    )
    dead = subprocess.run([sys.executable, "-c", opens_and_dies], cwd=root, capture_output=True, text=True)
    killed = dead.stdout.strip()
    assert dead.returncode == 9 and killed, dead.stderr[-2000:]
    client = MlflowClient(uri)
    assert client.get_run(killed).info.status == "RUNNING"
    _, alive = _open_parent(args)
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING"


@pytest.mark.slow
def test_grid_records_plain_and_variant_cells_and_skips_them_on_a_rerun(tmp_path):
    """benchmarks/grid.py end to end on the built-in subset at toy settings: a plain cell, then a named
    variant whose set is made again with its override, then a rerun that finds both recorded."""
    import hashlib
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    records = tmp_path / "records.json"
    common = [
        *("--preset tiny --data fadrm/assets/cifar10-mini.tar.gz --teacher-archs convnet --no-track".split()),
        *("--ipc 1 --seeds 0 --students convnet --labels soft --methods fadrm".split()),
        *("-S squeeze.epochs=1 -S evaluate.epochs=2 -S relabel.epochs=2 -S recover.iterations=2".split()),
        *("--out", str(tmp_path / "grid"), "--records", str(records), "--report", str(tmp_path / "b.md")),
    ]
    env = {**os.environ, "FADRM_PROGRESS": "1"}

    def grid(*args):
        done = subprocess.run([sys.executable, "benchmarks/grid.py", *args], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr

    grid("teachers", *common)
    grid("run", *common)
    log = grid("run", *common, "--variant", "a07", "-S", "recover.alpha=0.7")
    # the workers' progress lines in the grid's log name their cell
    assert "[a07 fadrm ipc1 s0] recover (fadrm): " in log
    assert "[a07 fadrm ipc1 s0 convnet soft] evaluate (convnet): 2/2 epoch (100%)" in log
    assert "0 to do" in grid("run", *common, "--variant", "a07", "-S", "recover.alpha=0.7")
    rows = json.loads(records.read_text())
    assert [(r.get("variant"), r["method"], r["ipc"], r["seed"]) for r in rows] == [
        (None, "fadrm", 1, 0),
        ("a07", "fadrm", 1, 0),
    ]
    teacher = (tmp_path / "grid/teachers/convnet/squeeze/0-convnet.safetensors").read_bytes()
    assert [r["teacher_sha256"] for r in rows] == [{"0-convnet": hashlib.sha256(teacher).hexdigest()}] * 2
    from grid import code_version

    assert [(r["code"], r["set_code"]) for r in rows] == [(code_version(),) * 2] * 2
    stage = json.loads((tmp_path / "grid/variants/a07/sets/fadrm-ipc1-s0/recover/stage.json").read_text())
    assert '"alpha": 0.7' in json.dumps(stage)
    assert "| a07 | 1 | fadrm |" in (tmp_path / "b.md").read_text()


def test_grid_records_name_the_code_and_see_the_checkout_move(tmp_path):
    """Each record names the commit its code came from (``+changes`` when the code differs from it), and a
    grid whose checkout moves under it says that its workers still run the code they started with."""
    import subprocess

    from grid import checkout_moved, code_version

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()

    assert code_version(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "fadrm").mkdir()
    (tmp_path / "fadrm" / "recover.py").write_text("alpha = 0.5\n")
    (tmp_path / "README.md").write_text("prose\n")
    git("add", "-A")
    git("commit", "-qm", "first")
    first = git("rev-parse", "HEAD")
    assert code_version(tmp_path) == first
    (tmp_path / "README.md").write_text("more prose\n")  # not code
    (tmp_path / "fadrm" / "new.py").write_text("")  # untracked: not imported by anything committed
    assert code_version(tmp_path) == first
    assert checkout_moved(first, tmp_path) is None
    (tmp_path / "fadrm" / "recover.py").write_text("alpha = 0.7\n")
    assert code_version(tmp_path) == f"{first}+changes"
    git("commit", "-qam", "second")
    second = git("rev-parse", "HEAD")
    note = checkout_moved(first, tmp_path)
    assert f"now at {second}" in note and f"still run {first}" in note


def test_grid_records_carry_the_baseline_a_variant_names():
    import argparse
    import subprocess

    from grid import _variant_fields

    args = argparse.Namespace(variant="psm4", set=["recover.bn_groups=4"], baseline="cpu")
    assert _variant_fields(args) == {"variant": "psm4", "overrides": ["recover.bn_groups=4"], "baseline": "cpu"}
    assert "baseline" not in _variant_fields(argparse.Namespace(variant="cpu", set=[], baseline=None))
    assert _variant_fields(argparse.Namespace(variant=None, set=[], baseline=None)) == {}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "benchmarks/grid.py", "run", "--baseline", "cpu"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 2 and "--baseline needs --variant" in done.stderr


def test_topology_table_names_cells_as_the_grid_does_now():
    """A variant whose cells became the main tables (`renamed_from`) is shown as `plain`, like the plain folder;
    random real images recover nothing, so they get one row, not a `recover` row copying their selection."""
    from topology import render

    def record(cell, method, stage, ratio):
        return {"cell": cell, "method": method, "stage": stage, "ratio": ratio, "set_mst_sum": 1.0, "real_mst_sum": 1.0}

    records = [
        record("grid/variants/teacher-e6/sets/random-ipc10-s0", "random", "select", 0.99),
        record("grid/variants/teacher-e6/sets/random-ipc10-s0", "random", "recover", 0.99),
        record("grid/sets/fadrm-ipc10-s1", "fadrm", "recover", 0.95),
        record("grid/variants/topology-5/sets/fadrm-ipc10-s0", "fadrm", "recover", 0.93),
    ]
    rows = [line.split(" | ")[:2] for line in render(records, frozenset({"teacher-e6"})).splitlines() if " | " in line][1:]
    assert rows == [["| plain fadrm-ipc10", "recover"], ["| plain random-ipc10", "select"], ["| topology-5 fadrm-ipc10", "recover"]]


def test_topology_spacing_compares_each_stage_with_one_real_reference(tiny_run):
    """benchmarks/topology.py on the tiny run: both stages against the same real subsets; a set of
    real images sits near ratio 1 (the tiny run's initial patches are real crops)."""
    import torch
    from topology import measure, render

    from fadrm.stage import Layout

    cfg, _ = tiny_run
    cell = Layout.of(cfg).stage("select").parent
    records = measure(cell, real=50, draws=20, device=torch.device("cpu"))
    assert [r["stage"] for r in records] == ["select", "recover"] and {r["ipc"] for r in records} == {2}
    assert records[0]["real_mst_sum"] == records[1]["real_mst_sum"] > 0
    assert 0.3 < records[0]["ratio"] < 1.7
    assert "| 1 |" in render(records)


def test_every_mutant_edits_text_the_package_still_has():
    """benchmarks/mutants.py edits the package by exact text; a refactor that renames that text would make
    the mutation run stop at that mutant (docs/mutants.md), so each original must still be there once."""
    from mutants import MUTANTS, ROOT

    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
    missing = [(m.name, (ROOT / m.file).read_text().count(m.old)) for m in MUTANTS]
    assert [(name, n) for name, n in missing if n != 1] == []
