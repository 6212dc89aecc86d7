"""Shared fixtures: quiet, isolated settings; the tiny pipeline run once per session;
small ImageFolder trees made of real images from the built-in CIFAR-10 subset."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="fadrm-tests-"))

# Set before anything imports prefect or mlflow.
os.environ.update(
    {
        "PREFECT_HOME": str(_SESSION_TMP / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION_TMP / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "FADRM_PROGRESS": "0",
        "GIT_AUTHOR_NAME": "fadrm tests",
        "GIT_AUTHOR_EMAIL": "tests@fadrm.invalid",
        "GIT_COMMITTER_NAME": "fadrm tests",
        "GIT_COMMITTER_EMAIL": "tests@fadrm.invalid",
    }
)
os.environ.pop("PREFECT_API_URL", None)

from fadrm.config import load_config  # noqa: E402
from fadrm.data.sources import builtin_archive  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def tiny_config(out_dir: Path, *overrides: str):
    """The tiny preset with its outputs in ``out_dir`` (tracking off unless asked)."""
    return load_config(None, "tiny", [f"out_dir={out_dir}", "tracking.enabled=false", *overrides])


@pytest.fixture(scope="session")
def builtin_tree() -> Path:
    """The built-in subset extracted once: an ImageFolder root of real CIFAR-10 JPEGs."""
    dest = _SESSION_TMP / "builtin"
    if not dest.exists():
        with tarfile.open(builtin_archive()) as tf:
            tf.extractall(dest, filter="data")
    return dest / "cifar10-mini"


def make_tree(src: Path, dest: Path, classes: list[str], train: int, test: int, test_name: str = "test") -> Path:
    """Copy ``train``/``test`` real images per class from ``src`` into a new ImageFolder."""
    for split, count, target in (("train", train, "train"), ("test", test, test_name)):
        for name in classes:
            folder = dest / target / name
            folder.mkdir(parents=True, exist_ok=True)
            for path in sorted((src / split / name).iterdir())[:count]:
                shutil.copy(path, folder / path.name)
    return dest


@pytest.fixture
def tiny_tree(builtin_tree, tmp_path) -> Path:
    """3 classes x (8 train, 4 test) real images."""
    return make_tree(builtin_tree, tmp_path / "tiny", ["airplane", "cat", "ship"], 8, 4)


@pytest.fixture(scope="session")
def tiny_run():
    """The whole tiny pipeline, run once for the session; returns (config, summary)."""
    from fadrm.pipeline import run_pipeline

    cfg = tiny_config(_SESSION_TMP / "tiny")
    return cfg, run_pipeline(cfg)


@pytest.fixture
def tiny_copy(tiny_run, tmp_path):
    """A private copy of the session's tiny outputs (for tests that rerun or break stages)."""
    cfg, _ = tiny_run
    dest = tmp_path / "out"
    shutil.copytree(cfg.out_dir, dest)
    return tiny_config(dest)


@pytest.fixture
def shared_archive() -> Path:
    if not SHARED_ARCHIVE.is_file():
        pytest.skip("needs ../shared/data/cifar10-jpeg.tar.gz (full CIFAR-10)")
    return SHARED_ARCHIVE


def wait_for_http(url: str, proc, timeout: float = 120) -> None:
    """Poll ``url`` until it answers; fail the test (and stop ``proc``) if it never does."""
    import signal
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    pytest.fail(f"{url} did not come up in {timeout} s")


def stop(proc, grace: float = 20) -> None:
    """Stop a server/worker started with start_new_session=True: TERM, then KILL if it lingers."""
    import signal
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone (or vanishing) between the listing and the read
        return None
    return stat.rsplit(")", 1)[1].split()
