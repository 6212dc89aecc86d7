"""The catalogue of bad inputs and faults (docs/faults.md): each ends with one clear message and
a non-zero exit status, never a traceback, and every check that can run before expensive work
does. Real files, real archives, real processes; the table in docs/faults.md names these tests."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fadrm.cli import app

from .conftest import make_tree, proc_stat

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TINY = ["--preset", "tiny", "--no-track"]


def _tree(builtin_tree, tmp_path, classes=("cat", "dog"), test_name="test") -> Path:
    return make_tree(builtin_tree, tmp_path / "data", list(classes), 4, 2, test_name=test_name)


def _folder(root: Path) -> list[str]:
    return [
        "-S",
        "data.source=imagefolder",
        "-S",
        f"data.path={root}",
        "-S",
        "data.train_per_class=null",
        "-S",
        "data.test_per_class=null",
    ]


def _tar(tmp_path: Path, builtin_tree: Path) -> Path:
    root = _tree(builtin_tree, tmp_path)
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="mydata")
    return archive


def setup_case(case: str, tmp_path: Path, builtin_tree: Path) -> list[str]:
    """The command line of one catalogue case (files it needs are made under ``tmp_path``)."""
    if case == "params-not-a-mapping":
        (tmp_path / "p.yaml").write_text("- a\n- list\n")
        return ["config", "-p", str(tmp_path / "p.yaml")]
    if case == "params-not-yaml":
        (tmp_path / "p.yaml").write_text("seed: [1,\n")
        return ["config", "-p", str(tmp_path / "p.yaml")]
    if case == "no-train-folder":
        (tmp_path / "data" / "stuff").mkdir(parents=True)
        return ["prepare", *TINY, *_folder(tmp_path / "data")]
    if case == "no-test-folder":
        root = _tree(builtin_tree, tmp_path)
        (root / "test").rename(root / "holdout")
        return ["prepare", *TINY, *_folder(root)]
    if case == "class-sets-differ":
        root = _tree(builtin_tree, tmp_path)
        shutil.rmtree(root / "test" / "dog")
        return ["prepare", *TINY, *_folder(root)]
    if case == "empty-class":
        root = _tree(builtin_tree, tmp_path)
        (root / "train" / "bird").mkdir()
        (root / "test" / "bird").mkdir()
        return ["prepare", *TINY, *_folder(root)]
    if case == "unreadable-image":
        root = _tree(builtin_tree, tmp_path)
        (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
        return ["prepare", *TINY, *_folder(root)]
    if case == "float-pixels":
        root = _tree(builtin_tree, tmp_path)
        Image.fromarray(np.zeros((32, 32), np.float32)).save(root / "train" / "cat" / "float.tif")
        return ["prepare", *TINY, *_folder(root)]
    if case == "mixed-sizes":
        root = _tree(builtin_tree, tmp_path)
        Image.new("RGB", (64, 40)).save(root / "train" / "dog" / "big.png")
        return ["prepare", *TINY, *_folder(root), "-S", "data.name=null"]
    if case == "truncated-archive":
        archive = _tar(tmp_path, builtin_tree)
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
        return ["prepare", *TINY, "-S", "data.source=tar", "-S", f"data.path={archive}"]
    if case == "not-an-archive":
        (tmp_path / "data.tar").write_bytes(os.urandom(4096))
        return ["prepare", *TINY, "-S", "data.source=tar", "-S", f"data.path={tmp_path / 'data.tar'}"]
    if case == "archive-member-escapes":
        with tarfile.open(tmp_path / "evil.tar", "w") as tf:
            tf.addfile(tarfile.TarInfo("../outside.txt"), io.BytesIO(b""))
        return ["prepare", *TINY, "-S", "data.source=tar", "-S", f"data.path={tmp_path / 'evil.tar'}"]
    if case == "archive-link":
        info = tarfile.TarInfo("train/cat/link.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        with tarfile.open(tmp_path / "link.tar", "w") as tf:
            tf.addfile(info)
        return ["prepare", *TINY, "-S", "data.source=tar", "-S", f"data.path={tmp_path / 'link.tar'}"]
    if case == "weights-missing-before-prepare":
        return ["run", "--local", *TINY, "-S", f"squeeze.teachers.0.weights={tmp_path / 'none.safetensors'}"]
    if case == "weights-do-not-fit":
        from safetensors.torch import save_file

        save_file({"conv.weight": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
        return ["run", "--local", *TINY, "-S", f"squeeze.teachers.0.weights={tmp_path / 'w.safetensors'}"]
    if case == "weights-malicious-pickle":
        (tmp_path / "evil.pt").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
        return ["run", "--local", *TINY, "-S", f"squeeze.teachers.0.weights={tmp_path / 'evil.pt'}"]
    if case == "baseline-not-json":
        (tmp_path / "b.json").write_text("{not json")
        return ["check", "--local", "--no-track", "--baseline", str(tmp_path / "b.json")]
    if case == "dvc-yaml-drift":
        broken = (ROOT / "dvc.yaml").read_text().replace("      - fadrm/stage.py\n", "", 1)
        (tmp_path / "dvc.yaml").write_text(broken)
        return ["dvc-yaml", "--path", str(tmp_path / "dvc.yaml")]
    raise KeyError(case)


# id -> (command line or None for setup_case, message (regex), exit status, nothing may be written)
CASES: dict[str, tuple[list[str] | None, str, int]] = {
    "unknown-key": (["squeeze", "-S", "squeeze.epoch=5"], r"unknown key 'squeeze.epoch' — did you mean 'squeeze.epochs'", 2),
    "wrong-type": (["config", "-S", "ipc=ten"], r"'ipc': Input should be a valid integer", 2),
    "below-minimum": (["config", "-S", "ipc=0"], r"'ipc': Input should be greater than or equal to 1", 2),
    "inverted-crop-scale": (
        ["config", "-S", "select.crop_scale=[1.0,0.08]"],
        r"'select.crop_scale': .*0 < smallest <= largest <= 1, got \(1.0, 0.08\)",
        2,
    ),
    "crop-scale-above-one": (["config", "-S", "relabel.crop_scale=[0.5,2]"], r"got \(0.5, 2.0\)", 2),
    "override-syntax": (["config", "-S", "ipc"], r"override 'ipc' is not of the form key.path=value", 2),
    "override-bad-yaml": (["config", "-S", "ipc=[1,"], r"override 'ipc=\[1,': value is not valid YAML", 2),
    "override-not-a-section": (["config", "-S", "ipc.x=1"], r"'ipc' is a value, not a section", 2),
    "override-bad-index": (["config", "-S", "squeeze.teachers.3.arch=convnet"], r"'3' is not an index of a list of 1", 2),
    "unknown-preset": (["config", "--preset", "fastest"], r"unknown preset 'fastest'; available: cifar10-cpu", 2),
    "missing-params-file": (["config", "-p", "/no/params.yaml"], r"params file not found: /no/params.yaml", 2),
    "params-not-a-mapping": (None, r"top level must be a mapping of sections", 2),
    "params-not-yaml": (None, r"not valid YAML", 2),
    "folder-source-without-path": (
        ["config", "-S", "data.source=imagefolder"],
        r"data.path is required when data.source is 'imagefolder'",
        2,
    ),
    "torchvision-unknown-name": (
        ["config", "-S", "data.source=torchvision", "-S", "data.name=svhn"],
        r"data.name must be cifar10 or cifar100 when data.source is 'torchvision'",
        2,
    ),
    "schedule-entry-too-small": (["config", "-S", "recover.schedule=[[4,10]]"], r"bad schedule entry \(4, 10\)", 2),
    "unknown-architecture": (["config", "-S", "evaluate.student=vgg11"], r"vgg11.*convnet", 2),
    "not-a-device": (["run", "--local", *TINY, "-S", "device=tpu:0"], r"device 'tpu:0' is not a device", 2),
    "fp16-on-cpu": (
        ["run", "--local", *TINY, "-S", "device=cpu", "-S", "recover.precision=fp16"],
        r"recover.precision: precision 'fp16' needs a CUDA device",
        2,
    ),
    "dataset-folder-missing": (
        ["run", "--local", *TINY, "-S", "data.source=imagefolder", "-S", "data.path=/no/such/dir"],
        r"data.path does not exist or is not a folder: /no/such/dir",
        2,
    ),
    "archive-missing": (
        ["run", "--local", *TINY, "-S", "data.source=tar", "-S", "data.path=/no/data.tar.gz"],
        r"archive not found: /no/data.tar.gz",
        2,
    ),
    "no-train-folder": (None, r"no 'train/' folder in .*data", 2),
    "no-test-folder": (None, r"no 'val/' or 'test/' folder beside 'train/'", 2),
    "class-sets-differ": (None, r"class sets differ between train/ and test/.*only in train: \['dog'\]", 2),
    "empty-class": (None, r"class 'bird' has no images", 2),
    "unreadable-image": (None, r"unreadable image .*broken.jpg", 2),
    "float-pixels": (None, r"float.tif: 32-bit floating-point pixels \(mode F\) have no defined range", 2),
    "mixed-sizes": (None, r"differ in size .*set data.resolution", 2),
    "truncated-archive": (None, r"data.tar.gz: the archive is truncated or corrupted .*download or copy it again", 2),
    "not-an-archive": (None, r"data.tar: not a readable tar archive", 2),
    "archive-member-escapes": (None, r"archive member '../outside.txt' would be written outside", 2),
    "archive-link": (None, r"archive member 'train/cat/link.jpg' is a link \(/etc/passwd\); refusing", 2),
    "weights-missing-before-prepare": (None, r"squeeze.teachers.0.weights: weights file not found", 2),
    "weights-do-not-fit": (None, r"does not fit the model: missing", 2),
    "weights-malicious-pickle": (None, r"evil.pt: cannot load weights safely", 2),
    "stage-without-inputs": (
        ["recover", *TINY, "-S", "out_dir=nothing-here"],
        r"'recover' needs the output of 'prepare' in nothing-here/prepare, which is missing",
        2,
    ),
    "baseline-missing-before-run": (
        ["check", "--local", "--no-track", "--baseline", "/no/baseline.json"],
        r"baseline file not found: /no/baseline.json",
        2,
    ),
    "baseline-not-json": (None, r"baseline file .*b.json is not valid JSON", 2),
    "mlflow-unreachable": (
        ["run", "--local", "--preset", "tiny", "-S", "tracking.uri=http://127.0.0.1:9"],
        r"MLflow tracking server http://127.0.0.1:9 is unreachable",
        2,
    ),
    "dvc-yaml-drift": (None, r"prepare.deps: missing fadrm/stage.py", 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_message(case, tmp_path, monkeypatch, builtin_tree):
    args, message, code = CASES[case]
    monkeypatch.chdir(tmp_path)
    if args is None:
        args = setup_case(case, tmp_path, builtin_tree)
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    # refused before any teacher was trained (nothing expensive ran first)
    assert not list(tmp_path.glob("outputs/**/squeeze"))


def test_the_debug_flag_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FADRM_DEBUG", "0")  # --debug sets it to 1; the monkeypatch takes it away after
    result = runner.invoke(app, ["--debug", "run", "--local", *TINY, "-S", "data.source=tar", "-S", "data.path=/no/data.tar.gz"])
    assert result.exit_code == 2 and "Traceback" in result.output and "archive not found" in result.output


def test_an_impossible_schedule_fails_before_the_teacher_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "--local", *TINY, "-S", "recover.schedule=[[32,2],[16,2]]"])
    assert result.exit_code == 2 and "recover.schedule ends at 16 px but the dataset is 32 px" in result.output
    assert not (tmp_path / "outputs").exists()  # found from the facts table, before even prepare


def test_a_class_too_small_for_ipc_fails_after_prepare_before_the_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "--local", *TINY, "-S", "ipc=101"])
    assert result.exit_code == 2 and "ipc=101 but class 'airplane' has only 100 training images" in result.output
    assert (tmp_path / "outputs" / "prepare").is_dir() and not (tmp_path / "outputs" / "squeeze").exists()


def test_a_damaged_input_is_named_with_what_to_rerun(tiny_copy, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (Path(tiny_copy.out_dir) / "relabel" / "labels.safetensors").write_bytes(b"")
    result = runner.invoke(app, ["evaluate", *TINY, "-S", f"out_dir={tiny_copy.out_dir}"])
    assert result.exit_code == 2, result.output
    assert "'evaluate' needs the output of 'relabel'" in result.output and "rerun `fadrm relabel`" in result.output
    assert "Traceback" not in result.output


def test_an_unreachable_prefect_server_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    result = runner.invoke(app, ["run", *TINY])
    assert result.exit_code == 2, result.output
    assert "the Prefect server at PREFECT_API_URL=http://127.0.0.1:9/api is unreachable" in result.output
    assert "--local" in result.output and not (tmp_path / "outputs").exists()


def _in_namespace(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``script`` in a private mount namespace (a real small or read-only file system)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip("unprivileged mount namespaces are not allowed here")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_a_full_disk_is_one_message(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    result = _in_namespace(
        f"mount -t tmpfs -o size=1m none {disk} && fadrm run --local --preset tiny --no-track -S out_dir={disk}/out", tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "the disk is full; free some space or write elsewhere (-S out_dir=...)" in output
    assert "Traceback" not in output


def test_a_read_only_output_folder_is_one_message(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    result = _in_namespace(
        f"mount -t tmpfs none {disk} && mkdir {disk}/out && mount -o remount,ro {disk} && "
        f"fadrm run --local --preset tiny --no-track -S out_dir={disk}/out",
        tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Read-only file system; that file system is read-only; write elsewhere (-S out_dir=...)" in output
    assert "Traceback" not in output


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc; none elsewhere)."""
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if (stat := proc_stat(int(p.name))) and stat[1] == str(pid)]


@pytest.mark.parametrize(
    ("signum", "code", "said", "local"),
    [
        (signal.SIGINT, 130, "interrupted", True),  # Ctrl-C
        (signal.SIGTERM, 143, "stopped by SIGTERM", True),  # `timeout`, a scheduler, `kill`
        # in a Prefect flow run, tracked: its MLflow runs end KILLED, not FAILED or RUNNING
        pytest.param(signal.SIGTERM, 143, "stopped by SIGTERM", False, marks=pytest.mark.slow),
    ],
    ids=["ctrl-c", "sigterm", "sigterm-prefect-tracked"],
)
def test_an_interrupt_keeps_finished_work_and_says_so(tmp_path, signum, code, said, local):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri}
    how = ["--local", *TINY] if local else ["--preset", "tiny"]
    proc = subprocess.Popen(
        ["fadrm", "run", *how, "-S", f"out_dir={tmp_path / 'out'}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a shell's background job (CI under nohup, `cmd &`) starts with SIGINT ignored, and a child inherits that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    import time

    deadline = time.time() + 600
    while not (tmp_path / "out" / ".squeeze.partial" / "0-convnet.ckpt").is_file():  # one epoch is finished work
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    children = _children(proc.pid)
    if not local and sys.platform.startswith("linux"):
        assert children, "no ephemeral Prefect server under the run"  # (was: left running after SIGTERM)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == code, output
    time.sleep(1)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "a child process outlived the run"
    assert f"{said}; finished work is kept and a rerun resumes" in output and "Traceback" not in output
    assert (tmp_path / "out" / ".squeeze.partial" / "0-convnet.ckpt").is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]
    if not local:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        statuses = {r.data.tags.get("fadrm.stage", "pipeline"): r.info.status for r in runs}
        assert statuses == {"pipeline": "KILLED", "prepare": "FINISHED", "squeeze": "KILLED"}


@pytest.mark.parametrize(("torchrun", "default"), [(False, False), (True, True)], ids=["alone", "torchrun-worker"])
def test_sigterm_is_left_to_torchrun_in_its_workers(torchrun, default):
    """torchrun stops its workers itself (SIGTERM, then SIGKILL); a worker blocked in a collective would only raise
    once the collective gave up, so under torchrun the CLI keeps the default SIGTERM (dies at once)."""
    check = (
        "import signal, sys, fadrm.cli.app; cli = sys.modules['fadrm.cli.app']; "
        "cli.app = lambda: print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL); cli.main()"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    if torchrun:
        env["TORCHELASTIC_RUN_ID"] = "test"
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == str(default), done.stderr[-2000:]


def test_the_catalogue_names_real_tests_and_has_at_least_40_entries():
    text = (ROOT / "docs" / "faults.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 40
    for row in rows:
        refs = re.findall(r"`(test_\w+)\.py::(\w+)(?:\[([^\]]+)\])?`", row)
        assert refs, row
        for module, test, case in refs:
            source = (ROOT / "tests" / f"{module}.py").read_text()
            assert f"def {test}(" in source, f"{module}::{test}"
            if module == "test_faults" and test == "test_bad_input_is_one_message":
                assert case in CASES, case
