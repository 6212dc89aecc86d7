"""MLflow lineage: the run tree, params, metrics, artifacts, failures, a real server, compare."""

import os
import re
import socket
import subprocess
import sys
from collections import Counter

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from fadrm.cli import app
from fadrm.config import load_config
from fadrm.errors import TrackingError
from fadrm.stage import STAGE_ORDER
from fadrm.tracker import NULL_TRACKER
from fadrm.tracking import open_tracker

from .conftest import stop, wait_for_http

runner = CliRunner()


def _uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _experiment_runs(uri, experiment="fadrm"):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=100)


def _artifacts(client, run_id, path=None):
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_pipeline_run_tree_params_metrics_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = _uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = runner.invoke(app, ["run", "--local", "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    client, runs = _experiment_runs(uri)
    parents = [r for r in runs if r.data.tags.get("fadrm.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(STAGE_ORDER)
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    # resolved config, flattened
    assert parent.data.params["recover.alpha"] == "0.5" and parent.data.params["preset"] == "tiny"
    # summary and efficiency figures
    for key in (
        "student_top1",
        "student_top5",
        "teacher_top1",
        "recover_s_per_image",
        "stages.recover.seconds",
        "stages.recover.peak_mem_mb",
    ):
        assert key in parent.data.metrics
    # lineage: dataset with its content hash, teachers' sha256, synthetic images' sources
    (dataset_input,) = parent.inputs.dataset_inputs
    assert dataset_input.dataset.name == "cifar10" and len(dataset_input.dataset.digest) == 32
    assert parent.data.tags["fadrm.dataset_sha256"].startswith(dataset_input.dataset.digest)
    assert len(parent.data.tags["fadrm.teacher.0-convnet.sha256"]) == 64
    parent_files = _artifacts(client, parent.info.run_id)
    assert {"config.yaml", "lineage/synthetic/manifest.json", "metrics.json", "plots/efficiency.json"} <= set(parent_files)
    by_stage = {r.info.run_name: r for r in children}
    assert {"0-convnet.safetensors", "0-convnet.json", "teachers.json"} <= set(_artifacts(client, by_stage["squeeze"].info.run_id))
    assert {"grid.png", "loss.png", "manifest.json"} <= set(_artifacts(client, by_stage["recover"].info.run_id))
    assert {"accuracy.png", "loss.png"} <= set(_artifacts(client, by_stage["evaluate"].info.run_id))
    # per-step history
    history = client.get_metric_history(by_stage["recover"].info.run_id, "recover_loss")
    assert len(history) > 1 and len({m.step for m in history}) == len(history)
    assert by_stage["recover"].data.params["recover.schedule"] == "[[24, 8], [32, 8]]"


def test_a_raising_stage_leaves_its_runs_failed(tmp_path):
    uri = _uri(tmp_path)
    cfg = load_config(None, "tiny", [f"tracking.uri={uri}", f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(RuntimeError, match="boom"):
        with open_tracker(cfg) as tracker, tracker.stage("recover"):
            raise RuntimeError("boom")
    client, runs = _experiment_runs(uri)
    (child,) = [r for r in runs if r.info.run_name == "recover"]
    (parent,) = [r for r in runs if r.info.run_id == child.data.tags["mlflow.parentRunId"]]
    assert child.info.status == "FAILED" and "boom" in child.data.tags["fadrm.error"]
    assert parent.info.status == "FAILED"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{_free_port()}"
    result = runner.invoke(app, ["run", "--local", "--preset", "tiny", "-S", f"tracking.uri={dead}"])
    assert result.exit_code == 2 and "unreachable" in result.output and "--no-track" in result.output
    assert not (tmp_path / "outputs").exists()
    cfg = load_config(None, "tiny", [f"tracking.uri={dead}", "tracking.on_unreachable=continue"])
    with open_tracker(cfg) as tracker:
        assert tracker is NULL_TRACKER
    with pytest.raises(TrackingError):
        with open_tracker(load_config(None, "tiny", [f"tracking.uri={dead}"])):
            pass


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            _uri(tmp_path / "server"),
            "--artifacts-destination",
            str(tmp_path / "server-art"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    (tmp_path / "server").mkdir()
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", proc)
    yield url
    stop(proc)


def test_a_real_mlflow_server_receives_the_run(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for stage in ("prepare", "squeeze"):
        result = runner.invoke(app, [stage, "--preset", "tiny", "-S", "squeeze.epochs=1"])
        assert result.exit_code == 0, result.output
    client, runs = _experiment_runs(mlflow_server)
    parents = [r for r in runs if r.data.tags.get("fadrm.kind") == "pipeline"]
    # the two stage commands of one pipeline land under one parent, as with `dvc repro`
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["prepare", "squeeze"]
    squeeze_run = next(r for r in children if r.info.run_name == "squeeze")
    assert "teacher_top1" in squeeze_run.data.metrics
    assert "0-convnet.safetensors" in _artifacts(client, squeeze_run.info.run_id)


def test_compare_two_runs(tiny_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = _uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    base = ["-S", f"out_dir={tiny_copy.out_dir}", "--preset", "tiny"]
    for method in ("fadrm", "sre2l"):
        for stage in ("select", "recover", "relabel", "evaluate"):
            result = runner.invoke(app, [stage, *base, "-S", f"method={method}"])
            assert result.exit_code == 0, result.output
    client, runs = _experiment_runs(uri)
    parents = [r for r in runs if r.data.tags.get("fadrm.kind") == "pipeline"]
    assert len(parents) == 2
    # distinct, meaningful names: method, IPC, preset, the run id's first characters
    assert sorted(p.info.run_name for p in parents) == sorted(
        f"{p.data.params['method']}-ipc2-tiny-{p.info.run_id[:7]}" for p in parents
    )
    ids = [p.info.run_id for p in parents]
    result = runner.invoke(app, ["compare", ids[0][:6], ids[1][:8]])  # the short ids the names carry
    assert result.exit_code == 0, result.output
    assert all(p.info.run_name in result.output for p in parents)
    assert "param method" in result.output and "sre2l" in result.output and "fadrm" in result.output
    assert "param recover.alpha" not in result.output  # only params that differ
    # what users compare first: accuracy (in percent), then the method's params, then efficiency
    rows = [re.split(r"\s{2,}", line)[0] for line in result.output.splitlines()[2:]]
    assert rows[:3] == ["status", "student_top1", "student_top5"]
    assert rows.index("teacher_top1") < rows.index("param method") < rows.index("recover_s_per_image")
    assert rows.index("total_seconds") < rows.index("stages.evaluate.seconds")
    student = next(line for line in result.output.splitlines() if line.startswith("student_top1"))
    assert re.fullmatch(r"student_top1(\s+\d+\.\d\d%){2}", student.strip()), student
    # ambiguity is refused with the candidates listed, never resolved silently
    result = runner.invoke(app, ["compare", "evaluate"])  # the stage runs of both pipelines
    assert result.exit_code == 2 and "name 'evaluate' matches more than one run" in result.output
    assert result.output.count("  evaluate  FINISHED") == 2
    experiment_id = client.get_experiment_by_name("fadrm").experiment_id
    for _ in range(17):  # 27 runs: at least two share their first hex digit
        client.create_run(experiment_id, run_name="filler")
    _, runs = _experiment_runs(uri)
    first = Counter(r.info.run_id[0] for r in runs).most_common(1)[0][0]
    result = runner.invoke(app, ["compare", first])
    assert result.exit_code == 2 and f"id prefix '{first}' matches more than one run" in result.output
    out = tmp_path / "cmp.md"
    result = runner.invoke(app, ["compare", *ids, "--format", "markdown", "--output", str(out)])
    assert result.exit_code == 0 and out.read_text().startswith("| ")
    result = runner.invoke(app, ["compare", parents[0].info.run_name, "--format", "csv"])
    assert result.exit_code == 0 and result.output.count("\n") > 3
    result = runner.invoke(app, ["compare", "no-such-run"])
    assert result.exit_code == 2 and "no MLflow run" in result.output


def test_runs_of_a_killed_process_are_marked_killed_when_the_next_run_starts(tmp_path):
    """A process killed mid-stage cannot close its MLflow runs; the next run on this host does."""
    import signal

    uri = _uri(tmp_path)
    victim = (
        "import os, signal\n"
        "from fadrm.config import load_config\n"
        "from fadrm.tracking import open_tracker\n"
        f"cfg = load_config(None, 'tiny', ['tracking.uri={uri}', 'out_dir={tmp_path / 'out'}'])\n"
        "with open_tracker(cfg) as tracker, tracker.stage('squeeze'):\n"
        "    print('running', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", victim], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL and "running" in killed.stdout
    client, runs = _experiment_runs(uri)
    assert sorted(r.info.status for r in runs) == ["RUNNING", "RUNNING"]  # parent and the squeeze child
    cfg = load_config(None, "tiny", [f"tracking.uri={uri}", f"out_dir={tmp_path / 'out'}"])
    with open_tracker(cfg):
        _, runs = _experiment_runs(uri)
        dead = [r for r in runs if r.info.status == "KILLED"]
        assert len(dead) == 2 and all("ended without closing this run" in r.data.tags["fadrm.error"] for r in dead)
        assert [r.info.status for r in runs if r not in dead] == ["RUNNING"]  # this run, alive, is left alone
