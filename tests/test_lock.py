"""One writer per output folder, its mechanics: a second writer is refused at once, naming the
holder; the lock is re-entrant within a process and released after. Real processes. (Two whole
runs at once, and a killed run's leftovers: test_defects.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from fadrm.layout import Layout
from fadrm.lock import OutputBusyError, hold

BIN = Path(sys.executable).parent


def fadrm(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(
        [str(BIN / "fadrm"), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    with hold(Layout(out)):
        started = time.time()
        second = fadrm("prepare", "--preset", "tiny", "--no-track", "-S", f"out_dir={out}", cwd=tmp_path)
        output, _ = second.communicate(timeout=300)
    assert second.returncode == 3, output
    assert f"is being written by pid {os.getpid()} on host {socket.gethostname()}, started " in output
    assert "-S out_dir=" in output and "Traceback" not in output
    assert time.time() - started < 120  # refused at once (the time is Python's start-up)
    assert not (out / "prepare").exists()


def test_the_lock_is_reentrant_in_a_process_and_released_after(tmp_path):
    layout = Layout(tmp_path / "out")
    with hold(layout), hold(layout):  # the pipeline holds it and each stage takes it again
        pass
    probe = (
        "import sys; from pathlib import Path; from fadrm.layout import Layout; from fadrm.lock import hold\n"
        f"with hold(Layout(Path({str(layout.root)!r}))): print('took it')"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "took it", out.stderr
    with hold(layout):
        probe_busy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert probe_busy.returncode == 1 and OutputBusyError.__name__ in probe_busy.stderr
