"""MLflow behind the :class:`fadrm.tracker.Tracker` interface — the only module that imports MLflow.

One *parent* run per pipeline run, one *child* run per stage. Where the parent comes from:

- ``fadrm run`` / the Prefect flow: a new parent for every pipeline run;
- ``fadrm <stage>`` (and so every ``dvc repro`` stage): the latest parent with the same
  pipeline key (config + git commit) that has no run of this stage yet, else a new one —
  so the stages of one ``dvc repro`` land under one parent;
- ``FADRM_PARENT_RUN_ID`` (or ``parent_run_id=``): attach to that parent (Prefect tasks).

The parent gets the resolved config (flattened params and ``config.yaml``), the lineage
(dataset input with its content hash, git commit, ``dvc.lock`` hash, teachers' sha256,
the synthetic images' source patches) and the run summary. A stage that raises leaves its
child run, and the parent, FAILED with the error. A process that is killed cannot say so:
every run records the host and process that owns it, and the next ``open_tracker`` on that
host marks the RUNNING runs of processes that no longer exist KILLED.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fadrm import distributed
from fadrm.config import Config, dump_yaml, fingerprint
from fadrm.errors import TrackingError
from fadrm.io import read_json, sha256_file
from fadrm.lock import process_alive, process_token
from fadrm.stage import Layout
from fadrm.tracker import NULL_TRACKER, Tracker, flatten

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_ENV = "FADRM_PARENT_RUN_ID"
KEY_TAG = "fadrm.pipeline_key"
STAGE_TAG = "fadrm.stage"
KIND_TAG = "fadrm.kind"
MAX_PARAM = 6000  # MLflow's limit on a param value
SHORT_ID = 7  # characters of a run id in run names and tables

HOST_TAG, PID_TAG, TOKEN_TAG = "fadrm.host", "fadrm.pid", "fadrm.pid_token"


def owner_tags() -> dict[str, str]:
    """Which process owns a run (so that a later run can tell whether it died)."""
    import socket

    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), TOKEN_TAG: str(process_token(pid))}


def close_dead_runs(client, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process no longer exists; return their ids."""
    import socket

    closed = []
    host = socket.gethostname().replace("'", "")
    for run in client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    ):
        tags = run.data.tags
        try:
            pid = int(tags.get(PID_TAG, ""))
        except ValueError:
            continue
        token = tags.get(TOKEN_TAG)
        if process_alive(pid, None if token in (None, "None") else token):
            continue
        client.set_tag(
            run.info.run_id,
            "fadrm.error",
            f"process {pid} on {host} ended without closing this run (killed or crashed); marked KILLED by the next run",
        )
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any work, when the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            problem = str(getattr(exc, "reason", exc))
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({problem}). Start it, fix MLFLOW_TRACKING_URI, "
            "or run without tracking: --no-track or -S tracking.on_unreachable=continue"
        )
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)


def git_commit(cwd: Path | None = None) -> str | None:
    """HEAD of the git checkout at ``cwd`` (the working directory by default); None outside one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def pipeline_key(cfg: Config, commit: str | None) -> str:
    """What makes two stage invocations parts of the same pipeline run."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in ("tracking", "device", "regression")}
    return fingerprint({"config": data, "commit": commit})


class MlflowTracker:
    """A Tracker bound to one MLflow run (a parent, or a stage's child run)."""

    def __init__(self, client, experiment_id: str, run_id: str, parent_id: str | None = None):
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.parent_id = parent_id

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[MlflowTracker]:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {MLFLOW_PARENT_RUN_ID: self.run_id, STAGE_TAG: name, KIND_TAG: "stage", **owner_tags()}
        commit = self.client.get_run(self.run_id).data.tags.get("mlflow.source.git.commit")
        if commit:
            tags["mlflow.source.git.commit"] = commit
        child = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        tracker = MlflowTracker(self.client, self.experiment_id, child.info.run_id, parent_id=self.run_id)
        try:
            yield tracker
        except BaseException as exc:
            fail_run(self.client, child.info.run_id, exc)
            raise
        self.client.set_terminated(child.info.run_id, "FINISHED")

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for start in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[start : start + 500])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), folder)

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: Mapping[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=digest[:32],  # the store keeps 36 characters; the full hash is in the profile and tags
            source_type="local",
            source=json.dumps({"uri": str(source)}),
            profile=json.dumps({**profile, "sha256": digest}),
        )
        entry = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
        for run_id in filter(None, {self.run_id, self.parent_id}):
            self.client.log_inputs(run_id, datasets=[entry])
            self.client.set_tag(run_id, "fadrm.dataset_sha256", digest)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:MAX_PARAM]


def fail_run(client, run_id: str, exc: BaseException) -> None:
    """Close a run FAILED, or KILLED when it was stopped (Ctrl-C, a signal), with the error as its `fadrm.error` tag."""
    message = f"{type(exc).__name__}: {exc}"[:5000]
    client.set_tag(run_id, "fadrm.error", message)
    stopped = isinstance(exc, KeyboardInterrupt) or getattr(exc, "signal", None) is not None  # Prefect's signals
    client.set_terminated(run_id, "KILLED" if stopped else "FAILED")


# ----------------------------------------------------------------------------- opening a run


@contextlib.contextmanager
def open_tracker(
    cfg: Config,
    *,
    stage: str | None = None,
    parent_run_id: str | None = None,
    enabled: bool = True,
    run_name: str | None = None,
) -> Iterator[Tracker]:
    """The tracker for a pipeline run (``stage=None``) or for one stage run on its own.

    Yields :data:`NULL_TRACKER` when tracking is off, or unreachable with
    ``tracking.on_unreachable: continue``; otherwise raises :class:`TrackingError` before any
    work starts.
    """
    if not (enabled and cfg.tracking.enabled and distributed.is_main()):  # torchrun helpers do not log
        yield NULL_TRACKER
        return
    uri = tracking_uri(cfg)
    try:
        check_reachable(uri)
        client, experiment_id = _client(uri, cfg.tracking.experiment)
    except TrackingError:
        if cfg.tracking.on_unreachable == "continue":
            print(f"warning: tracking is off for this run: MLflow at {uri} is unreachable")  # noqa: T201
            yield NULL_TRACKER
            return
        raise
    try:
        close_dead_runs(client, experiment_id)
    except Exception as exc:  # noqa: BLE001 - housekeeping must not stop a run
        print(f"warning: could not check for runs of killed processes: {exc}")  # noqa: T201
    parent_run_id = parent_run_id or (os.environ.get(PARENT_ENV) if stage else None)
    owns_parent = parent_run_id is None
    if owns_parent:
        parent_run_id = _parent_for(client, experiment_id, cfg, stage, run_name)
    else:
        client.get_run(parent_run_id)  # fails clearly if it does not exist
    tracker = MlflowTracker(client, experiment_id, parent_run_id)
    started = time.time()
    try:
        yield tracker
    except BaseException as exc:
        if owns_parent:
            fail_run(client, parent_run_id, exc)
        raise
    if owns_parent:
        record_lineage(tracker, cfg, since=started)
        client.set_terminated(parent_run_id, "FINISHED")


def _client(uri: str, experiment: str):
    try:
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(uri)
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    except Exception as exc:  # any store failure is a tracking failure, reported before work starts
        raise TrackingError(f"MLflow store {uri} refused the request: {exc}") from None
    return client, experiment_id


def _parent_for(client, experiment_id: str, cfg: Config, stage: str | None, run_name: str | None) -> str:
    commit = git_commit()
    key = pipeline_key(cfg, commit)
    if stage is not None:
        for run in client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{KEY_TAG}` = '{key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        ):
            children = client.search_runs(
                [experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and tags.`{STAGE_TAG}` = '{stage}'",
                max_results=1,
            )
            if not children:
                client.update_run(run.info.run_id, status="RUNNING")
                for tag, value in owner_tags().items():  # this process owns it now
                    client.set_tag(run.info.run_id, tag, value)
                return run.info.run_id
    tags = {KEY_TAG: key, KIND_TAG: "pipeline", "fadrm.method": cfg.method, "fadrm.preset": str(cfg.preset), **owner_tags()}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if Path("dvc.lock").is_file():
        tags["fadrm.dvc_lock_sha256"] = sha256_file(Path("dvc.lock"))
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    if run_name is None:
        client.update_run(run.info.run_id, name=run_label(cfg, run.info.run_id))
    parent = MlflowTracker(client, experiment_id, run.info.run_id)
    parent.log_params(flatten({k: v for k, v in cfg.to_dict().items() if k != "tracking"}))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(dump_yaml(cfg))
        parent.log_artifact(path)
    return run.info.run_id


def run_label(cfg: Config, run_id: str) -> str:
    """A pipeline run's name: what it is (method, IPC, preset if any) and which one (the run
    id's first characters, which ``fadrm compare`` accepts too), e.g. ``fadrm-ipc10-3f9a2c1``."""
    preset = f"-{cfg.preset}" if cfg.preset else ""
    return f"{cfg.method}-ipc{cfg.ipc}{preset}-{run_id[:SHORT_ID]}"


def record_lineage(tracker: MlflowTracker, cfg: Config, since: float) -> None:
    """Attach what this run produced and where it came from to the parent run."""
    layout = Layout.of(cfg)
    manifest = layout.stage("prepare") / "manifest.json"
    if manifest.is_file():
        data = read_json(manifest)
        profile = {"classes": len(data["classes"]), **{f"{s}_images": sum(c.values()) for s, c in data["counts"].items()}}
        tracker.log_dataset(data["name"], data["dataset_hash"], data.get("source_path", ""), "distillation", profile)
    teachers = layout.stage("squeeze") / "teachers.json"
    if teachers.is_file():
        tracker.set_tags({f"fadrm.teacher.{c['name']}.sha256": c["sha256"] for c in read_json(teachers)})
    recovered = layout.stage("recover") / "manifest.json"
    if recovered.is_file():
        tracker.log_artifact(recovered, "lineage/synthetic")
    if layout.summary.is_file() and layout.summary.stat().st_mtime >= since:
        summary = read_json(layout.summary)
        tracker.log_metrics({k: v for k, v in flatten(summary).items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracker.log_artifact(layout.summary)
    for name in ("efficiency", "evaluate_accuracy", "recover_loss"):
        tracker.log_artifact(layout.plot(name), "plots")


# ----------------------------------------------------------------------------- comparing runs


def connect(cfg: Config):
    """(client, experiment id) for reading runs; raises TrackingError when unreachable."""
    uri = tracking_uri(cfg)
    check_reachable(uri)
    return _client(uri, cfg.tracking.experiment)


def find_runs(client, experiment_id: str, refs: list[str], latest: int = 10) -> list:
    """Runs by id, unique id prefix or run name; without refs, the latest pipeline runs.

    A prefix or a name that matches more than one run is refused with the candidates listed,
    never resolved silently to one of them.
    """
    if not refs:
        return client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{KIND_TAG}` = 'pipeline'",
            order_by=["attributes.start_time DESC"],
            max_results=latest,
        )
    return [_find_run(client, experiment_id, ref) for ref in refs]


def _find_run(client, experiment_id: str, ref: str):
    from mlflow.exceptions import MlflowException

    quoted = ref.replace("'", "\\'")
    by_id = []
    if len(ref) == 32:  # a whole run id, in any experiment
        with contextlib.suppress(MlflowException):
            return client.get_run(ref)
    if ref and all(c in "0123456789abcdef" for c in ref.lower()):
        by_id = client.search_runs(
            [experiment_id],
            filter_string=f"attributes.run_id LIKE '{ref.lower()}%'",
            order_by=["attributes.start_time DESC"],
            max_results=AMBIGUOUS_SHOWN + 1,
        )
    found = by_id or client.search_runs(
        [experiment_id],
        filter_string=f"attributes.run_name = '{quoted}'",
        order_by=["attributes.start_time DESC"],
        max_results=AMBIGUOUS_SHOWN + 1,
    )
    if not found:
        raise TrackingError(f"no MLflow run with id, id prefix or name '{ref}' in experiment {experiment_id}")
    if len(found) > 1:
        what = "id prefix" if by_id else "name"
        listed = "\n".join(
            f"  {r.info.run_id[:12]}  {r.info.run_name}  {r.info.status}  {_started(r)}" for r in found[:AMBIGUOUS_SHOWN]
        )
        more = "\n  ..." if len(found) > AMBIGUOUS_SHOWN else ""
        raise TrackingError(f"{what} '{ref}' matches more than one run; name one by its id (any unique prefix):\n{listed}{more}")
    return found[0]


def _started(run) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000)) if run.info.start_time else "-"


AMBIGUOUS_SHOWN = 10

# What users compare first: accuracy, then how the method was set, then what it cost.
HEADLINE_METRICS = ("student_top1", "student_top5", "student_best_top1", "teacher_top1", "recover_psnr")
METHOD_PARAMS = ("method", "ipc", "preset", "seed", "select.", "recover.", "relabel.", "evaluate.", "squeeze.", "data.")
EFFICIENCY_METRICS = ("recover_s_per_image", "relabel_bytes_per_image_epoch", "total_seconds", "stages.")


def comparison(runs: list, all_params: bool = False) -> dict[str, Any]:
    """One column per run, rows in the order users read them: accuracy, then the params that
    differ (or all) in method order, then efficiency, then any other metric."""
    columns = [{"id": r.info.run_id, "name": r.info.run_name, "status": r.info.status} for r in runs]
    param_keys = sorted(set().union(*(r.data.params for r in runs)), key=_rank(METHOD_PARAMS))
    params = {k: [r.data.params.get(k) for r in runs] for k in param_keys}
    if not all_params:
        params = {k: v for k, v in params.items() if len(set(v)) > 1}
    metric_keys = set().union(*(r.data.metrics for r in runs))
    headline = [k for k in HEADLINE_METRICS if k in metric_keys]
    efficiency = sorted((k for k in metric_keys if k.startswith(EFFICIENCY_METRICS)), key=_rank(EFFICIENCY_METRICS))
    other = sorted(metric_keys - set(headline) - set(efficiency))
    metrics = lambda keys: {k: [r.data.metrics.get(k) for r in runs] for k in keys}  # noqa: E731
    return {
        "runs": columns,
        "accuracy": metrics(headline),
        "params": params,
        "efficiency": metrics(efficiency),
        "metrics": metrics(other),
    }


def _rank(prefixes: tuple[str, ...]):
    """Sort key: by the first prefix a key starts with (unlisted keys last), then by name."""

    def key(name: str) -> tuple[int, str]:
        return next((i for i, p in enumerate(prefixes) if name == p or name.startswith(p)), len(prefixes)), name

    return key


def mlflow_run_link(cfg: Config, run_id: str) -> str:
    """Where to look at a run: a URL for a server, the `mlflow ui` command for a local store."""
    uri = tracking_uri(cfg)
    try:
        client, _ = _client(uri, cfg.tracking.experiment)
        experiment_id = client.get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a link is a courtesy; never fail a run over it
        return f"run {run_id} in {uri}"
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"run {run_id}: `mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{path}"


# ----------------------------------------------------------------------------- regression baselines

BASELINE_TAG = "fadrm.baseline"


def load_baseline(cfg: Config, ref: str) -> tuple[dict[str, Any], str]:
    """A baseline as ``{"metrics", "params"}`` and a description of where it came from.

    ``ref``: a JSON file path; ``mlflow:<run id or name>``; or ``mlflow:tagged`` for the
    latest run tagged ``fadrm.baseline=true``.
    """
    from fadrm.regression import read_baseline

    if not ref.startswith("mlflow:"):
        return read_baseline(Path(ref)), ref
    client, experiment_id = connect(cfg)
    name = ref.removeprefix("mlflow:")
    if name == "tagged":
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{BASELINE_TAG}` = 'true'", order_by=["attributes.start_time DESC"], max_results=1
        )
        if not found:
            raise TrackingError(f"no MLflow run tagged {BASELINE_TAG}=true in '{cfg.tracking.experiment}'")
        run = found[0]
    else:
        (run,) = find_runs(client, experiment_id, [name])
    params = {k: _parse_param(v) for k, v in run.data.params.items()}
    return {"metrics": dict(run.data.metrics), "params": params}, f"mlflow run {run.info.run_id}"


def judge(summary: dict[str, Any], cfg: Config, tolerances: Mapping[str, float], ref: str):
    """The regression verdict of a finished run against the baseline ``ref``, and its report."""
    from fadrm.regression import check, report_markdown

    baseline, source = load_baseline(cfg, ref)
    verdict = check(summary, baseline, dict(tolerances), cfg.to_dict(), source)
    return verdict, report_markdown(verdict)


def _parse_param(text: str) -> Any:
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def record_verdict(cfg: Config, run_id: str, verdict, report: str) -> None:
    """Tag the pipeline run with the verdict and attach the report."""
    client, experiment_id = connect(cfg)
    tracker = MlflowTracker(client, experiment_id, run_id)
    tracker.set_tags(
        {"fadrm.regression": "passed" if verdict.passed else "failed", "fadrm.regression.baseline": verdict.baseline_source}
    )
    tracker.log_metrics({f"regression.{c.metric}.change": c.change for c in verdict.checks if c.change is not None})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "regression.md").write_text(report)
        (Path(tmp) / "regression.json").write_text(json.dumps(verdict.to_dict(), indent=2))
        tracker.log_artifact(Path(tmp) / "regression.md", "regression")
        tracker.log_artifact(Path(tmp) / "regression.json", "regression")
