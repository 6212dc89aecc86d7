"""DVC for real: `dvc repro` of the tiny preset in a temporary git repo, partial reruns,
experiments, and push/pull through a local remote."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fadrm.config import STAGE_PARAMS, dump_yaml, load_config
from fadrm.stage import STAGE_ORDER

ROOT = Path(__file__).resolve().parents[1]


BIN = str(Path(sys.executable).parent)  # fadrm and dvc of this environment, as `.ci/run` has them


def sh(cwd, *args, check=True):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def make_project(dest: Path, *overrides: str) -> Path:
    """A git + DVC project holding this repo's pipeline with the tiny preset resolved into params.yaml."""
    dest.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    shutil.copytree(ROOT / "fadrm", dest / "fadrm", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = load_config(None, "tiny", ["tracking.enabled=false", *overrides])
    (dest / "params.yaml").write_text(dump_yaml(cfg))
    (dest / ".gitignore").write_text("__pycache__/\n")
    sh(dest, "git", "init", "-q")
    sh(dest, "dvc", "init", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "project")
    return dest


def repository_copy(dest: Path) -> Path:
    """What a clone of this repository holds for DVC (dvc.yaml, .dvc/config with its remote, the package,
    .gitignore), committed in a new git repo, with the tiny preset resolved into params.yaml."""
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"):
        (dest / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "fadrm", dest / "fadrm", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "params.yaml").write_text(dump_yaml(load_config(None, "tiny", ["tracking.enabled=false"])))
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "fadrm")
    return dest


def readme_commands(heading: str) -> list[str]:
    """The lines of the first ```bash block after ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    start = section.index("```bash\n") + len("```bash\n")
    return [line for line in section[start : section.index("```", start)].splitlines() if line.strip()]


def test_dvc_yaml_mirrors_the_stage_table():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(spec) == list(STAGE_ORDER)
    for name, stage in spec.items():
        assert stage["cmd"] == f"fadrm {name}"
        assert stage["params"] == list(STAGE_PARAMS[name])
        assert f"fadrm/stages/{name}.py" in stage["deps"]
        assert stage["outs"][0] == f"${{out_dir}}/{name}"


def test_dvc_shows_headline_metrics_and_offline_charts():
    """`dvc metrics show` / `dvc exp show` read one short file; `dvc plots show` gets images only (no Vega,
    whose HTML loads its JavaScript from a CDN)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    declared = [m for stage in spec["stages"].values() for m in stage.get("metrics", [])]
    assert declared == [{"${out_dir}/headline.json": {"cache": False}}]
    assert not any("plots" in stage for stage in spec["stages"].values())
    assert spec["plots"] and all(str(plot).endswith(".png") for plot in spec["plots"])


@pytest.mark.slow
def test_readme_dvc_commands_run_verbatim(tmp_path):
    """The README's DVC block, line by line as a user pastes it, in a copy of this repository: run, commit,
    push, an experiment and its table, metrics and plots, then a fresh clone that pulls and is up to date."""
    project = repository_copy(tmp_path / "fadrm")
    shown = {}
    for line in readme_commands("## DVC: versioned stages"):
        shown[line.split("#")[0].strip()] = out = sh(project, "bash", "-c", line)
        print(f"$ {line}\n{out}")
    outputs = list(shown.values())
    assert all(f"Running stage '{name}'" in outputs[0] for name in STAGE_ORDER)
    exp_show = next(out for cmd, out in shown.items() if cmd.startswith("dvc exp show"))
    assert "recover.alpha" in exp_show and "student_top1_pct" in exp_show and "0.7" in exp_show
    assert max(map(len, exp_show.splitlines())) <= 120, exp_show  # fits a terminal
    metrics = shown["dvc metrics show"]
    assert "outputs/headline.json" in metrics and max(map(len, metrics.splitlines())) <= 100, metrics
    html = (project / "dvc_plots" / "index.html").read_text()
    assert html.count("<img") == 6 and "http://" not in html and "https://" not in html  # opens offline
    assert "Data and pipelines are up to date." in outputs[-1]
    assert (tmp_path / "fadrm-copy" / "outputs" / "evaluate" / "student.safetensors").is_file()
    assert "dvc_plots" not in sh(project, "git", "status", "--porcelain")  # generated, ignored


@pytest.mark.slow
def test_repro_partial_rerun_experiments_push_and_pull(tmp_path):
    project = make_project(tmp_path / "project")
    out = sh(project, "dvc", "repro")
    for name in STAGE_ORDER:
        assert f"Running stage '{name}'" in out
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGE_ORDER)
    assert "up to date" in sh(project, "dvc", "status")
    metrics = json.loads(sh(project, "dvc", "metrics", "show", "--json"))
    assert "student_top1" in json.dumps(metrics)

    # `fadrm run` makes the very same outputs as `dvc repro` (DVC's hashes of every stage folder agree)
    def stage_dirs(stages):  # the stage folders; the metrics files hold timings and differ by design
        return {n: [o for o in s["outs"] if o["path"] == f"outputs/{n}"] for n, s in stages.items()}

    before = stage_dirs(lock)
    out = sh(project, "fadrm", "run", "--local", "--force")
    assert "outputs committed to DVC" in out
    after = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert stage_dirs(after) == before and all(len(v) == 1 for v in before.values())

    # one param changed: only that stage and those after it rerun; the teacher is not retrained
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["recover"]["alpha"] = 0.7
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(project, "dvc", "repro")
    assert [n for n in STAGE_ORDER if f"Running stage '{n}'" in out] == ["recover", "relabel", "evaluate"]
    assert "Stage 'squeeze' didn't change" in out
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "alpha 0.7")

    # push to a local remote; a fresh clone pulls and has nothing to redo
    remote = tmp_path / "remote"
    sh(project, "dvc", "remote", "add", "-d", "local", str(remote))
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "remote")
    sh(project, "dvc", "push")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    sh(clone, "dvc", "pull")
    assert (clone / "outputs" / "recover" / "manifest.json").is_file()
    assert "up to date" in sh(clone, "dvc", "status")
    assert "didn't change" in sh(clone, "dvc", "repro") or "up to date" in sh(clone, "dvc", "repro")

    # an experiment with a -S override, listed by `dvc exp show`
    sh(project, "dvc", "exp", "run", "-S", "recover.alpha=0.6")
    shown = sh(project, "dvc", "exp", "show", "--json")
    assert "0.6" in shown and "student_top1" in shown


def test_sweep_is_one_matrix_stage(tmp_path):
    project = make_project(tmp_path / "project")
    (project / "sweeps").mkdir()
    shutil.copy(ROOT / "sweeps" / "matrix.dvc.yaml", project / "sweeps" / "dvc.yaml")
    out = sh(project, "dvc", "stage", "list", "sweeps/dvc.yaml")
    points = [line.split()[0] for line in out.splitlines() if line.startswith("sweeps/dvc.yaml:distill@")]
    assert len(points) == 8 and "sweeps/dvc.yaml:distill@fadrm-10" in points
    spec = yaml.safe_load((ROOT / "sweeps" / "matrix.dvc.yaml").read_text())
    assert list(spec["stages"]) == ["distill"] and "matrix" in spec["stages"]["distill"]
