"""Prefect for real: the flow under the test harness (one server per session), the regression
check passing and failing, DVC knowing a flow's outputs, and a deployment picked up by a
worker from a Prefect server on 127.0.0.1 (with its cron schedule)."""

import contextlib
import json
import os
import re
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


def _task_runs(flow_state) -> list[str]:
    """Names of the task runs of one flow run, in the order they started."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), sort=TaskRunSort.EXPECTED_START_TIME_ASC
        )
    return [r.name for r in runs]


def test_distill_flow_on_tiny(harness, tmp_path, monkeypatch):
    """The flow is the pipeline function with each stage a task: the stages that run are the ones
    run_pipeline finds stale (all, then none, then the one whose params changed)."""
    from prefect.client.orchestration import get_client

    from flows.distill import distill_flow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = {"params": str(tmp_path / "none.yaml"), "preset": "tiny"}
    state = distill_flow(**args, overrides=[f"out_dir={tmp_path / 'out'}"], return_state=True)
    summary = state.result()
    assert summary["student_top1"] is not None and set(summary["stages"]) == set(STAGE_ORDER)
    assert _task_runs(state) == list(STAGE_ORDER)
    # the same MLflow run tree as `fadrm run --local` and `dvc repro`
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(STAGE_ORDER)
    with get_client(sync_client=True) as prefect:
        artifact = prefect.read_latest_artifacts()
    keys = {a.key for a in artifact}
    assert {"fadrm-summary", "fadrm-stages"} <= keys
    markdown = next(a for a in artifact if a.key == "fadrm-summary").data
    assert "student top-1" in markdown and summary["mlflow_run_id"] in markdown
    again = distill_flow(**args, overrides=[f"out_dir={tmp_path / 'out'}"], track=False, return_state=True)
    assert again.is_completed() and _task_runs(again) == []
    changed = distill_flow(**args, overrides=[f"out_dir={tmp_path / 'out'}", "evaluate.epochs=2"], track=False, return_state=True)
    assert _task_runs(changed) == ["evaluate"]


def test_flow_outputs_are_known_to_dvc(harness, tmp_path, monkeypatch, capfd):
    from flows.distill import distill_flow

    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    summary = distill_flow(params="params.yaml", track=False)
    assert summary["dvc"].startswith("outputs committed")
    assert "up to date" in sh(project, "dvc", "status")
    again = distill_flow(params="params.yaml", track=False)  # nothing reran: the lock file is already right
    assert again["dvc"] == "dvc.lock already matched these outputs"
    assert "Updating lock file" not in "".join(capfd.readouterr())  # said once, by us, not once per stage


@pytest.mark.slow  # two smoke pipelines (2-3 min on 2 cores); `fadrm check --local` gives the same verdict by default
def test_regression_check_passes_unchanged_and_fails_degraded(harness, tmp_path, monkeypatch):
    """The regression flow called as a function: passed on the baseline, failed with the metric named when
    degraded, and both verdicts in MLflow."""
    from flows.regression import regression_flow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = regression_flow(params=str(tmp_path / "none.yaml"), baseline=str(BASELINE))
    assert result["verdict"]["passed"]
    with pytest.raises(RegressionFailed, match="teacher_top1"):
        regression_flow(params=str(tmp_path / "none.yaml"), baseline=str(BASELINE), overrides=["squeeze.lr=0.000001"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    verdicts = [
        r.data.tags.get("fadrm.regression")
        for r in client.search_runs(
            [client.get_experiment_by_name("fadrm").experiment_id], filter_string="tags.`fadrm.kind` = 'pipeline'"
        )
    ]
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
    (run,) = client.search_runs([client.get_experiment_by_name("fadrm").experiment_id], filter_string="tags.`fadrm.kind` = 'pipeline'")
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
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    server = subprocess.Popen(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_http(f"{url}/health", server)
    yield env
    stop(server)


def _cli(env, *args, timeout=600):
    return subprocess.run(["fadrm", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_deployment_is_run_by_a_worker(prefect_server, tmp_path):
    env = {**prefect_server, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out_dir = tmp_path / "deployed"
    deployed = _cli(
        env, "deploy", "--pool", "test-pool", "--name", "cpu", "--devices", "", "--preset", "tiny", "-S", f"out_dir={out_dir}"
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    worker = subprocess.Popen(
        ["prefect", "worker", "start", "--pool", "test-pool", "--type", "process"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        run = subprocess.run(
            ["prefect", "deployment", "run", "fadrm-distill/cpu", "--watch", "--watch-timeout", "600"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=660,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Completed" in run.stdout + run.stderr
    finally:
        stop(worker)
    summary = json.loads((out_dir / "metrics.json").read_text())
    assert summary["student_top1"] is not None


def test_regression_schedule_is_registered(harness, monkeypatch):
    """`fadrm schedule` against a live Prefect API (the module's Prefect test server, in this process)."""
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from fadrm.cli import app

    monkeypatch.chdir(ROOT)
    scheduled = CliRunner().invoke(app, ["schedule", "--cron", "0 3 * * *", "--pool", "test-pool", "--name", "nightly"])
    assert scheduled.exit_code == 0, scheduled.output
    with get_client(sync_client=True) as prefect:
        deployment = prefect.read_deployment_by_name("fadrm-regression/nightly")
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    # one check at a time: they share outputs/regression
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"


def _api(env, method: str, path: str, body: dict | None = None):
    """One call of the Prefect REST API of the test server."""
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        env["PREFECT_API_URL"] + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    return json.loads(text) if text else None


def _deployment_runs(env, deployment_id: str) -> list[dict]:
    return _api(
        env,
        "POST",
        "/flow_runs/filter",
        {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 50},
    )


def _wait_for(what: str, probe, timeout: float, log: Path):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(2)
    pytest.fail(f"{what} did not happen in {timeout:.0f} s; worker log:\n{log.read_text()[-4000:]}")


TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@pytest.mark.slow
def test_cron_schedule_runs_the_regression_check(prefect_server, tmp_path):
    """`fadrm schedule --cron` against a real `prefect server start`: within the next period the server's
    scheduler creates a flow run, a process worker runs it, the check passes, and its verdict is in MLflow
    and in a Prefect artifact of that flow run. (Under SQLAlchemy 2.1 no run is ever created.)"""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**prefect_server, "MLFLOW_TRACKING_URI": uri}
    scheduled = _cli(
        env,
        "schedule",
        "--cron",
        "* * * * *",
        "--pool",
        "cron-pool",
        "--name",
        "every-minute",
        "--devices",
        "",
        "-S",
        f"out_dir={tmp_path / 'regression'}",
    )
    assert scheduled.returncode == 0, scheduled.stdout + scheduled.stderr
    deployment_id = _api(env, "GET", "/deployments/name/fadrm-regression/every-minute")["id"]
    log = tmp_path / "worker.log"
    with log.open("w") as sink:
        worker = subprocess.Popen(
            ["prefect", "worker", "start", "--pool", "cron-pool", "--type", "process"],
            env=env,
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = _wait_for(
            "a scheduled run picked up by the worker",
            lambda: [r for r in _deployment_runs(env, deployment_id) if r["state_type"] not in ("SCHEDULED", "CANCELLED")],
            300,
            log,
        )[0]
        _api(env, "POST", f"/deployments/{deployment_id}/pause_deployment")  # no second check after this one
        run = _wait_for(
            "the scheduled run's end",
            lambda: next(
                (r for r in _deployment_runs(env, deployment_id) if r["id"] == started["id"] and r["state_type"] in TERMINAL), None
            ),
            900,
            log,
        )
    finally:
        _stop_worker(worker)
    print(
        f"scheduled flow run {run['id']} ({run['name']}), expected {run['expected_start_time']}: "
        f"{run['state_type']} / {run['state_name']}"
    )
    assert run["auto_scheduled"] and run["state_type"] == "COMPLETED", log.read_text()[-4000:]
    artifacts = _api(
        env, "POST", "/artifacts/filter", {"artifacts": {"key": {"any_": ["fadrm-regression"]}, "flow_run_id": {"any_": [run["id"]]}}}
    )
    assert len(artifacts) == 1 and "Regression check: PASSED" in artifacts[0]["data"]
    client = MlflowClient(tracking_uri=uri)
    (pipeline,) = client.search_runs(
        [client.get_experiment_by_name("fadrm").experiment_id], filter_string="tags.`fadrm.kind` = 'pipeline'"
    )
    assert pipeline.data.tags["fadrm.regression"] == "passed"


def _stop_worker(worker) -> None:
    """Stop the worker and any flow-run process it started (they run in sessions of their own)."""
    import psutil

    try:
        children = psutil.Process(worker.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    stop(worker)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--dask", "local:2"]], ids=["one-process", "dask"])
def test_a_prefect_run_prints_no_traceback_and_no_warning(tmp_path, extra):
    """`fadrm run` as a new user runs it (a temporary Prefect server, Prefect's default log level, no
    analytics or timeout setting of ours): the output has no traceback, no ERROR or WARNING line; with
    --dask, the workers use the flow's temporary server instead of starting one each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FADRM_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    result = subprocess.run(
        ["fadrm", "run", "--preset", "tiny", "-S", f"out_dir={tmp_path / 'out'}", *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    noisy = [line for line in output.splitlines() if re.search(r"\b(ERROR|WARNING|CRITICAL)\b|Warning:", line)]
    assert noisy == [], output[-4000:]
    assert "student top-1" in output
    assert output.count("Starting temporary server") == 1, output[-4000:]


@pytest.mark.slow
def test_a_local_dask_cluster_of_two_workers_runs_the_shards_and_changes_no_byte(harness, tmp_path):
    """`fadrm run --dask local:2`: select and recover run as one Prefect task per shard on a local
    Dask cluster of two worker processes; the stages then assemble exactly what one process makes
    from the same inputs at the same thread count (Dask's workers run one: OMP_NUM_THREADS=1)."""
    import shutil

    import torch
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from fadrm.stages.recover import recover
    from fadrm.stages.select import select
    from flows.distill import distill_flow

    from .conftest import tiny_config

    out = tmp_path / "out"
    state = distill_flow(
        params=str(tmp_path / "none.yaml"), preset="tiny", overrides=[f"out_dir={out}"], track=False, dask="local:2", return_state=True
    )
    state.result()
    runs = _task_runs(state)  # the stages stay tasks of this flow; each fan-out is a subflow before its stage
    assert [r for r in runs if not r.startswith("fadrm-shards")] == list(STAGE_ORDER)
    assert runs.index("select") - 1 == runs.index("fadrm-shards-0") and runs[runs.index("recover") - 1].startswith("fadrm-shards")
    names = [f"{stage} shard {i}/2" for stage in ("select", "recover") for i in range(2)]
    with get_client(sync_client=True) as prefect:
        shards = prefect.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=names)))
    assert sorted(r.name for r in shards if r.state.is_completed()) == sorted(names)
    metrics = {stage: json.loads((out / "metrics" / f"{stage}.json").read_text()) for stage in ("select", "recover")}
    assert metrics["select"]["selected_classes"] == 0 and metrics["recover"]["recovered_images"] == 0  # all by shards
    # one process, one thread, from the Dask run's own prepared data and teacher
    one = tmp_path / "one"
    # without the stages' outputs and their shard files (which would be reused, not recomputed)
    shutil.copytree(out, one, ignore=shutil.ignore_patterns("select", "recover", ".select.partial", ".recover.partial"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        select(tiny_config(one))
        recover(tiny_config(one))
    finally:
        torch.set_num_threads(threads)
    recomputed = {stage: json.loads((one / "metrics" / f"{stage}.json").read_text()) for stage in ("select", "recover")}
    assert recomputed["select"]["selected_classes"] > 0 and recomputed["recover"]["recovered_images"] > 0  # not reused
    for stage in ("select", "recover"):
        ours, theirs = out / stage / "images", one / stage / "images"
        files = sorted(p.relative_to(theirs) for p in theirs.rglob("*.png"))
        assert files and files == sorted(p.relative_to(ours) for p in ours.rglob("*.png"))
        assert all((ours / f).read_bytes() == (theirs / f).read_bytes() for f in files), stage


def test_a_malformed_dask_address_is_refused_before_any_work():
    from fadrm.errors import ConfigError
    from flows.sharding import parse_address

    assert parse_address("local:3") == (None, 3) and parse_address("tcp://10.0.0.2:8786") == ("tcp://10.0.0.2:8786", None)
    for bad in ("local:0", "local:two", "somewhere"):
        with pytest.raises(ConfigError, match="--dask"):
            parse_address(bad)
