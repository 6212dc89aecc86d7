"""The command line through Typer's test runner, and the rule that the core stays free of
MLflow, Prefect, Typer and DVC."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fadrm.cli import app
from fadrm.stage import STAGE_ORDER

runner = CliRunner()
COMMANDS = [*STAGE_ORDER, "run", "config", "presets", "compare", "check", "deploy", "schedule"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    if command != "presets":
        for option in ("--params", "--set", "--preset"):
            assert option in result.output


def test_top_level_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


def test_config_prints_the_resolved_yaml():
    result = runner.invoke(app, ["config", "--preset", "tiny", "-S", "recover.alpha=0.7"])
    assert result.exit_code == 0
    data = yaml.safe_load(result.output)
    assert data["preset"] == "tiny" and data["recover"]["alpha"] == 0.7 and data["ipc"] == 2


def test_presets_are_listed():
    result = runner.invoke(app, ["presets"])
    assert {"smoke", "tiny", "default", "cifar10-cpu", "cifar100", "tiny-imagenet", "imagenet-1k"} <= set(result.output.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["squeeze", "-S", "squeeze.epoch=5"], "unknown key 'squeeze.epoch'"),
        (["prepare", "-S", "data.source=imagefolder", "-S", "data.path=/no/such/dir", "--no-track"], "does not exist"),
        (["recover", "-S", "out_dir=/no/outputs/here", "--no-track"], "needs the output of 'prepare'"),
        (["run", "--local", "-p", "/no/params.yaml"], "params file not found"),
        (["run", "--preset", "fastest"], "unknown preset"),
    ],
)
def test_bad_input_is_one_message_and_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_stage_commands_run_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--preset", "tiny", "--no-track", "-S", "squeeze.epochs=1", "-S", "evaluate.epochs=2"]
    for stage in STAGE_ORDER:
        result = runner.invoke(app, [stage, *common])
        assert result.exit_code == 0, result.output
        assert f"{stage}:" in result.output
    assert (tmp_path / "outputs" / "metrics.json").is_file()
    result = runner.invoke(app, ["run", "--local", *common])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output and "student top-1" in result.output


def test_core_imports_no_orchestration_or_tracking_library():
    code = (
        "import sys, importlib, pathlib, fadrm\n"
        "root = pathlib.Path(fadrm.__file__).parent\n"
        "for path in sorted(root.rglob('*.py')):\n"
        "    name = '.'.join(('fadrm',) + path.relative_to(root).with_suffix('').parts).removesuffix('.__init__')\n"
        "    if not name.startswith(('fadrm.cli', 'fadrm.tracking', 'fadrm.__main__')):\n"
        "        importlib.import_module(name)\n"
        "assert 'fadrm.stages.recover' in sys.modules and 'fadrm.cli' not in sys.modules\n"
        "bad = sorted({n.split('.')[0] for n in sys.modules} & {'mlflow', 'prefect', 'typer', 'dvc'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# Which module may import each library: one adapter per tool, so that the core never does.
OWNERS = {"mlflow": ("fadrm/tracking.py",), "dvc": ("fadrm/dvc_sync.py",), "prefect": ("flows/",), "typer": ("fadrm/cli/",)}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_each_tool_is_imported_by_its_one_adapter():
    root = Path(__file__).resolve().parents[1]
    misplaced = []
    for path in sorted([*root.glob("fadrm/**/*.py"), *root.glob("flows/*.py")]):
        rel = path.relative_to(root).as_posix()
        for name in _imports(path):
            owner = OWNERS.get(name.split(".")[0])
            if owner and not rel.startswith(owner):
                misplaced.append(f"{rel} imports {name}")
    assert misplaced == []


def test_stages_do_not_import_each_other():
    """Shared readers live beside the stages (fadrm/teachers.py loads the teachers for select, recover,
    relabel). One exception is left: evaluate reads relabel's soft labels through relabel.SoftLabels."""
    root = Path(__file__).resolve().parents[1] / "fadrm" / "stages"
    crossing = {
        (path.stem, name.rsplit(".", 1)[1])
        for path in root.glob("*.py")
        for name in _imports(path)
        if name.startswith("fadrm.stages.") and name != f"fadrm.stages.{path.stem}"
    }
    assert crossing == {("evaluate", "relabel")}


def test_check_local_passes_on_the_baseline_and_exits_1_on_a_regression(tmp_path, monkeypatch):
    """`fadrm check --local` is the flow's regression function without Prefect: same verdict, recorded in MLflow."""
    from mlflow import MlflowClient

    baseline = str(Path(__file__).resolve().parents[1] / "benchmarks" / "baselines" / "smoke.json")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    passed = runner.invoke(app, ["check", "--local", "--baseline", baseline])
    assert passed.exit_code == 0, passed.output
    assert "teacher_top1" in passed.output
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fadrm").experiment_id], filter_string="tags.`fadrm.kind` = 'pipeline'")
    assert run.data.tags["fadrm.regression"] == "passed" and run.data.tags["fadrm.regression.baseline"] == baseline
    assert "regression/regression.md" in [a.path for a in client.list_artifacts(run.info.run_id, "regression")]
    # a teacher that cannot learn (and, to keep the suite short, a student trained 2 epochs on its labels)
    degraded = ["squeeze.lr=0.000001", "squeeze.epochs=1", "relabel.epochs=2", "evaluate.epochs=2", "evaluate.eval_every=1"]
    failed = runner.invoke(app, ["check", "--local", "--no-track", "--baseline", baseline, *[a for o in degraded for a in ("-S", o)]])
    assert failed.exit_code == 1, failed.output
    assert "regression against" in failed.output
    assert re.search(r"\| teacher_top1 \|[^\n]*\*\*regressed\*\*", failed.output), failed.output
