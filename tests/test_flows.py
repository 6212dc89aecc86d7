"""Prefect for real: the flow under the test harness (one server per session), the regression
check passing and failing, DVC knowing a flow's outputs, and a deployment picked up by a
worker from a Prefect server on 127.0.0.1 (with its cron schedule)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fadrm.regression import RegressionFailed
from fadrm.stage import STAGE_ORDER

from .conftest import stop, wait_for_http
from .test_dvc import make_project, sh

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "benchmarks" / "baselines" / "smoke.json"


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_distill_flow_on_tiny(harness, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.distill import distill_flow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    summary = distill_flow(params=str(tmp_path / "none.yaml"), preset="tiny", overrides=[f"out_dir={tmp_path / 'out'}"])
    assert summary["student_top1"] is not None and set(summary["stages"]) == set(STAGE_ORDER)
    # the same MLflow run tree as `fadrm run --local` and `dvc repro`
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(STAGE_ORDER)
    with get_client(sync_client=True) as prefect:
        artifact = prefect.read_latest_artifacts()
    keys = {a.key for a in artifact}
    assert {"fadrm-summary", "fadrm-stages"} <= keys
    markdown = next(a for a in artifact if a.key == "fadrm-summary").data
    assert "student top-1" in markdown and summary["mlflow_run_id"] in markdown


def test_flow_outputs_are_known_to_dvc(harness, tmp_path, monkeypatch):
    from flows.distill import distill_flow

    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    summary = distill_flow(params="params.yaml", track=False)
    assert summary["dvc"].startswith("outputs committed")
    assert "up to date" in sh(project, "dvc", "status")


def test_regression_check_passes_unchanged_and_fails_degraded(harness, tmp_path, monkeypatch):
    from flows.regression import regression_flow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = regression_flow(params=str(tmp_path / "none.yaml"), baseline=str(BASELINE))
    assert result["verdict"]["passed"]
    with pytest.raises(RegressionFailed, match="teacher_top1"):
        regression_flow(params=str(tmp_path / "none.yaml"), baseline=str(BASELINE),
                        overrides=["squeeze.lr=0.000001"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    verdicts = [r.data.tags.get("fadrm.regression") for r in client.search_runs(
        [client.get_experiment_by_name("fadrm").experiment_id], filter_string="tags.`fadrm.kind` = 'pipeline'")]
    assert sorted(verdicts) == ["failed", "passed"]


BROKEN = {
    "student-lr": (["-S", "evaluate.lr=1e-7"], "student_top1"),
    "merge-skipped": ([], "recover_psnr"),  # the code's merge replaced by a plain resize (below)
    "untrained-teacher": (["-S", "squeeze.epochs=0"], "teacher_top1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["working", *BROKEN])
def test_fadrm_check_passes_a_working_pipeline_and_fails_broken_ones(harness, tmp_path, monkeypatch, case):
    """`fadrm check` (the Prefect regression flow, as scheduled) on the smoke preset and the committed
    baseline: exit 0 when the pipeline works; exit 1 with the failing metric named, the verdict in
    MLflow and a Prefect artifact when it is broken."""
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from fadrm.cli import app
    from fadrm.stages import recover as recover_module

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args, metric = BROKEN.get(case, ([], None))
    if case == "merge-skipped":
        monkeypatch.setattr(recover_module, "residual_merge", lambda x, init, alpha, size: recover_module.resize(x, size))
    result = CliRunner().invoke(app, ["check", "--baseline", str(BASELINE), *args])
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fadrm").experiment_id],
                                filter_string="tags.`fadrm.kind` = 'pipeline'")
    with get_client(sync_client=True) as prefect:
        report = next(a for a in prefect.read_latest_artifacts() if a.key == "fadrm-regression").data
    if case == "working":
        assert result.exit_code == 0, result.output
        assert run.data.tags["fadrm.regression"] == "passed" and "Regression check: PASSED" in report
        return
    assert result.exit_code == 1, result.output
    assert "regression against" in result.output and metric in result.output
    assert run.data.tags["fadrm.regression"] == "failed"
    assert "Regression check: FAILED" in report and f"| {metric} |" in report
    failing = [line for line in report.splitlines() if "**regressed**" in line]
    assert any(line.startswith(f"| {metric} |") for line in failing)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_http(f"{url}/health", server)
    yield env
    stop(server)


def _cli(env, *args, timeout=600):
    return subprocess.run(["fadrm", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_deployment_is_run_by_a_worker(prefect_server, tmp_path):
    env = {**prefect_server, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out_dir = tmp_path / "deployed"
    deployed = _cli(env, "deploy", "--pool", "test-pool", "--name", "cpu", "--devices", "", "--preset", "tiny",
                    "-S", f"out_dir={out_dir}")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "test-pool", "--type", "process"],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        run = subprocess.run(["prefect", "deployment", "run", "fadrm-distill/cpu", "--watch",
                              "--watch-timeout", "600"], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=660)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Completed" in run.stdout + run.stderr
    finally:
        stop(worker)
    summary = json.loads((out_dir / "metrics.json").read_text())
    assert summary["student_top1"] is not None


def test_regression_schedule_is_registered(prefect_server):
    scheduled = _cli(prefect_server, "schedule", "--cron", "0 3 * * *", "--pool", "test-pool", "--name", "nightly")
    assert scheduled.returncode == 0, scheduled.stdout + scheduled.stderr
    inspect = subprocess.run(["prefect", "deployment", "inspect", "fadrm-regression/nightly"], env=prefect_server,
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    assert "'cron': '0 3 * * *'" in inspect.stdout or '"cron": "0 3 * * *"' in inspect.stdout
