"""Issue 12's measured defects, one test each (or one parametrized test), written against the
interfaces that existed before the fix (run_pipeline, is_current, the stage functions, the CLI),
so that each fails on the code as it was (cc5585b) and passes now. Assertions on the new
explanations (stale_reason, ...) come after the behaviour, with their imports inside the test.
The other defects of the issue are covered by test_faults.py (tracebacks, late validation),
test_tracking.py (MLflow runs of killed processes) and test_pipeline.py (resumed history)."""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from fadrm.config import RecoverConfig, load_config
from fadrm.errors import DivergenceError
from fadrm.losses import BNStatsLoss
from fadrm.models import create_model
from fadrm.pipeline import run_pipeline
from fadrm.stage import STAGE_ORDER, Layout, is_current
from fadrm.stages import evaluate as evaluate_module
from fadrm.stages.evaluate import evaluate
from fadrm.stages.prepare import prepare
from fadrm.stages.recover import Teacher, recover, recover_batch
from fadrm.stages.relabel import relabel
from fadrm.stages.select import select
from fadrm.stages.squeeze import squeeze

from .conftest import make_tree, tiny_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def current(stage: str, cfg) -> bool:
    return is_current(stage, cfg, Layout.of(cfg))  # the layout argument, as the code before the fix required


def running(seen: list[tuple[str, str]]) -> list[str]:
    return [stage for stage, status in seen if status.startswith("running")]


# ----------------------------------------------------------------------------- stale results reported as current


def _png_tree(builtin_tree: Path, dest: Path) -> Path:
    root = make_tree(builtin_tree, dest, ["airplane", "cat", "ship"], 8, 4)
    for jpg in sorted(root.rglob("*.jpg")):  # PNG, so that an in-place edit is exact
        with Image.open(jpg) as img:
            img.convert("RGB").save(jpg.with_suffix(".png"))
        jpg.unlink()
    return root


def test_a_dataset_image_changed_in_place_reruns_what_depends_on_it(builtin_tree, tmp_path):
    root = _png_tree(builtin_tree, tmp_path / "data")
    cfg = tiny_config(
        tmp_path / "out",
        "data.source=imagefolder",
        f"data.path={root}",
        "data.name=three",
        "data.resolution=32",
        "data.train_per_class=null",
        "data.test_per_class=null",
        "squeeze.epochs=1",
        "ipc=1",
        "select.candidates=4",
    )
    run_pipeline(cfg, until="squeeze")
    assert current("prepare", cfg) and current("squeeze", cfg)
    image = root / "train" / "cat" / sorted(os.listdir(root / "train" / "cat"))[0]
    st = image.stat()
    pixels = np.asarray(Image.open(image)).copy()
    pixels[:8, :8] = 255 - pixels[:8, :8]
    Image.fromarray(pixels).save(image, format="PNG")  # same path ...
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old modification time
    assert not current("prepare", cfg) and not current("squeeze", cfg)
    seen = []
    run_pipeline(cfg, until="squeeze", announce=lambda s, status: seen.append((s, status)))
    assert running(seen) == ["prepare", "squeeze"]
    from fadrm.stage import stale_reason

    assert stale_reason("prepare", cfg) is None
    Image.fromarray(255 - pixels).save(image, format="PNG")
    assert stale_reason("prepare", cfg) == f"input files changed: 1, e.g. {image.relative_to(root).as_posix()}"


def test_a_teacher_weights_file_changed_in_place_makes_squeeze_stale(tmp_path):
    weights = tmp_path / "teacher.safetensors"
    model = create_model("convnet", 10, 32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cfg = tiny_config(tmp_path / "out", f"squeeze.teachers.0.weights={weights}")
    run_pipeline(cfg, until="squeeze")
    assert current("squeeze", cfg)
    st = weights.stat()
    save_file({k: (v * 1.01 if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}, str(weights))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert current("prepare", cfg) and not current("squeeze", cfg)


@pytest.mark.parametrize(
    "damage, stage, reason",
    [
        ("delete a synthetic image", "recover", "1 file(s) missing, e.g. images/0000/000.png"),
        ("empty the soft labels", "relabel", "labels.safetensors changed size ({size} -> 0 bytes)"),
        ("add a stray file", "select", "1 file(s) not written by the stage, e.g. images/0000/extra.png"),
        ("overwrite a teacher, same size", "squeeze", "0-convnet.safetensors changed content since the stage wrote it"),
    ],
)
def test_a_damaged_output_is_not_up_to_date(tiny_copy, damage, stage, reason):
    assert all(current(s, tiny_copy) for s in STAGE_ORDER)
    folder = Layout.of(tiny_copy).stage(stage)
    reason = reason.format(size=(folder / "labels.safetensors").stat().st_size if stage == "relabel" else 0)
    if damage == "delete a synthetic image":
        (folder / "images" / "0000" / "000.png").unlink()
    elif damage == "empty the soft labels":
        (folder / "labels.safetensors").write_bytes(b"")
    elif damage == "add a stray file":
        shutil.copy(folder / "images" / "0000" / "000.png", folder / "images" / "0000" / "extra.png")
    else:
        path = folder / "0-convnet.safetensors"
        blob = bytearray(path.read_bytes())
        blob[-1] ^= 0xFF
        path.write_bytes(bytes(blob))
    assert not current(stage, tiny_copy)
    assert not any(current(s, tiny_copy) for s in STAGE_ORDER[STAGE_ORDER.index(stage) :])
    from fadrm.stage import stale_reason

    assert stale_reason(stage, tiny_copy) == f"output damaged: {reason}"
    seen = []
    run_pipeline(tiny_copy, announce=lambda s, status: seen.append((s, status)))
    assert running(seen)[0] == stage and all(current(s, tiny_copy) for s in STAGE_ORDER)


# ----------------------------------------------------------------------------- two writers, one folder


def _fadrm(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen([str(BIN / "fadrm"), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"{what} never happened: {proc.communicate()[0] if proc.poll() is not None else 'timeout'}")
        time.sleep(0.02)


FULL = ["--preset", "tiny", "--no-track", "-S", "data.train_per_class=null", "-S", "data.test_per_class=null"]


@pytest.mark.slow
def test_two_runs_on_one_folder_the_second_refused_the_first_as_if_alone(tiny_run, tmp_path):
    """The issue's case: `fadrm run` twice at once on one out_dir, with ipc 2 and ipc 1. The second is
    refused while the first trains its teacher; the first's outputs are those of a run alone."""
    lone_cfg, _ = tiny_run
    out = tmp_path / "out"
    first = _fadrm("run", "--local", "--no-track", "--preset", "tiny", "-S", f"out_dir={out}", cwd=tmp_path)
    _wait_for(lambda: (out / ".squeeze.partial" / "0-convnet.ckpt").is_file(), first, "the first run's epoch 1", 900)
    second = _fadrm("run", "--local", "--no-track", "--preset", "tiny", "-S", "ipc=1", "-S", f"out_dir={out}", cwd=tmp_path)
    refused, _ = second.communicate(timeout=600)
    done, _ = first.communicate(timeout=1800)
    assert first.returncode == 0, done
    assert second.returncode == 3 and f"is being written by pid {first.pid}" in refused, refused
    assert "Traceback" not in refused
    for stage in STAGE_ORDER:
        assert tree_hashes(out / stage) == tree_hashes(Path(lone_cfg.out_dir) / stage), stage


def test_a_killed_writer_leaves_nothing_behind_after_the_next_run(tmp_path):
    out = tmp_path / "out"
    victim = _fadrm("prepare", *FULL, "-S", f"out_dir={out}", cwd=tmp_path)
    _wait_for(lambda: any(out.glob(".prepare-scratch-*/*")), victim, "prepare's scratch folder")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert any(out.glob(".prepare-scratch-*")) and any(out.glob(".prepare.tmp-*"))  # dataset-sized leftovers
    seen = []
    run_pipeline(
        tiny_config(out, "data.train_per_class=null", "data.test_per_class=null"),
        until="prepare",
        announce=lambda stage, status: seen.append((stage, status)),
    )
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".fadrm"] == []
    assert (out / "prepare" / "stage.json").is_file()
    took_over = [status for stage, status in seen if stage == "lock"]
    assert took_over[0].startswith(f"took over from pid {victim.pid} on host ")
    assert ".prepare-scratch-" in took_over[1]


# ----------------------------------------------------------------------------- staleness too broad, too narrow


def _stale_with(package: Path, out_dir: Path) -> list[str]:
    """The stages a copy of the package (edited) judges stale."""
    code = (
        "import fadrm; from fadrm.config import load_config; from fadrm.stage import STAGE_ORDER, Layout, is_current\n"
        f"assert fadrm.__file__.startswith({str(package)!r}), fadrm.__file__\n"
        f"cfg = load_config(None, 'tiny', ['out_dir={out_dir}', 'tracking.enabled=false'])\n"
        "print(','.join(s for s in STAGE_ORDER if not is_current(s, cfg, Layout.of(cfg))))"
    )
    env = {**os.environ, "PYTHONPATH": str(package)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=package, capture_output=True, text=True, check=True)
    return [s for s in out.stdout.strip().split(",") if s]


def test_editing_code_reruns_exactly_the_stages_that_run_it(tiny_copy, tmp_path):
    package = tmp_path / "src"
    shutil.copytree(ROOT / "fadrm", package / "fadrm", ignore=shutil.ignore_patterns("__pycache__"))
    assert _stale_with(package, tiny_copy.out_dir) == []
    app = package / "fadrm" / "cli" / "app.py"
    app.write_text(app.read_text() + "\n# a comment in the CLI\n")
    assert _stale_with(package, tiny_copy.out_dir) == []  # the CLI is no stage's code
    losses = package / "fadrm" / "losses.py"
    losses.write_text(losses.read_text() + "\n# a comment in the losses\n")
    assert _stale_with(package, tiny_copy.out_dir) == ["recover", "relabel", "evaluate"]


def test_params_that_no_stage_reads_rerun_nothing(tiny_copy):
    changed = tiny_config(tiny_copy.out_dir, "data.workers=2", "tracking.log_every=3")
    assert [s for s in STAGE_ORDER if not current(s, changed)] == []
    assert not current("prepare", tiny_config(tiny_copy.out_dir, "data.test_per_class=40"))


def _imported_package_files(module: str) -> set[str]:
    """The package files ``module`` runs, by this test's own reading of the imports (not fadrm.codedeps)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
            base = ROOT.joinpath(*parts[:i])
            path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and rel not in seen:
                seen.add(rel)
                for node in ast.walk(ast.parse(path.read_text())):
                    if isinstance(node, ast.Import):
                        todo += [a.name for a in node.names if a.name.startswith("fadrm")]
                    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fadrm"):
                        todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return seen


def test_dvc_yaml_deps_name_every_module_a_stage_runs():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in STAGE_ORDER:
        runs = _imported_package_files(f"fadrm.stages.{name}")
        assert {"fadrm/config.py", "fadrm/device.py", "fadrm/stage.py", "fadrm/io.py"} <= runs
        assert sorted(runs - set(spec[name]["deps"])) == [], name
        listed = {d for d in spec[name]["deps"] if d.endswith(".py")}
        assert sorted(listed - runs) == [], name


# ----------------------------------------------------------------------------- divergence caught where it happens


def _files(folder: Path) -> dict[str, str]:
    return tree_hashes(folder) if folder.is_dir() else {}


def test_a_teacher_whose_loss_diverges_is_not_accepted(tiny_copy):
    before = _files(Layout.of(tiny_copy).stage("squeeze"))
    with pytest.raises(DivergenceError, match=r"squeeze 0-convnet: .* epoch 1.*lower squeeze.lr \(now 50\)"):
        squeeze(tiny_config(tiny_copy.out_dir, "squeeze.lr=50"))
    assert _files(Layout.of(tiny_copy).stage("squeeze")) == before  # nothing published


def test_relabel_does_not_publish_logits_evaluate_would_trip_over(tiny_copy, tmp_path):
    """A loaded teacher whose logits reach 1e6 (finite, so squeeze keeps it): stored as fp16 they would be
    infinite, and evaluate would fail blaming its own learning rate."""
    model = create_model("convnet", 10, 32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    head = [k for k in state if k.endswith("weight") and state[k].ndim == 2][-1]
    state[head] = state[head] * 1e6
    save_file(state, str(tmp_path / "loud.safetensors"))
    cfg = tiny_config(tiny_copy.out_dir, f"squeeze.teachers.0.weights={tmp_path / 'loud.safetensors'}", "method=rded")
    squeeze(cfg)
    select(cfg)
    recover(cfg)
    before = _files(Layout.of(cfg).stage("relabel"))
    with pytest.raises(
        DivergenceError,
        match=r"relabel: teacher logits up to .* at epoch 1, views 0-19 do not fit "
        r"fp16 storage",
    ):
        relabel(cfg)
    assert _files(Layout.of(cfg).stage("relabel")) == before


def test_recovery_with_an_absurd_step_size_fails(tiny_copy):
    with pytest.raises(
        DivergenceError,
        match=r"recover: \d+% of the pixels are pinned at 0 or 255 after iteration "
        r"8/16 \(stage 1, 24 px; .*lower recover.lr \(now 10000\)",
    ):
        recover(tiny_config(tiny_copy.out_dir, "recover.lr=10000"))


def test_evaluation_with_an_absurd_step_size_fails(tiny_copy):
    with pytest.raises(
        DivergenceError,
        match=r"evaluate \(convnet\): training loss exploded to .* by epoch 1 .*"
        r"lower evaluate.lr \(now 1000\)",
    ):
        evaluate(tiny_config(tiny_copy.out_dir, "evaluate.lr=1000"))


class NanGradient(nn.Module):
    """Finite outputs, but a NaN gradient: d sqrt(0 * x) / dx = 0 * inf."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.sqrt((x * 0).mean((2, 3))))


def test_non_finite_gradients_are_caught_at_the_step_not_published_as_images():
    """The check after the (fp16) scaler's unscale sees the gradient; a check of the loss alone lets
    a finite loss with NaN gradients turn the images into NaN."""
    model = NanGradient().eval().requires_grad_(False)
    bounds = (torch.full((1, 3, 1, 1), -2.0), torch.full((1, 3, 1, 1), 2.0))
    rc = RecoverConfig(schedule=((16, 1),), lr=0.1)
    with pytest.raises(DivergenceError, match=r"gradients became non-finite at iteration 1/1 .*lower recover.lr"):
        recover_batch(
            torch.zeros(3, 3, 16, 16),
            torch.tensor([0, 1, 2]),
            [Teacher("t", model, BNStatsLoss(model))],
            rc.schedule,
            rc,
            merges=True,
            bounds=bounds,
            jitter_limit=0,
            crop_scale=(1.0, 1.0),
            precision="fp32",
            rng=np.random.default_rng(0),
        )


def test_the_last_partial_accumulation_group_is_scaled_by_its_real_size(tiny_copy, monkeypatch):
    """20 images in micro-batches of 5, 3 per step: steps of 3 and 1 micro-batches. What reaches
    backward is each micro-batch's loss times its share of its step's samples (1 for a step of one)."""
    losses, scaled = [], []
    real_kl, real_scale = evaluate_module.soft_kl, torch.amp.GradScaler.scale
    monkeypatch.setattr(evaluate_module, "soft_kl", lambda *a: losses.append(real_kl(*a)) or losses[-1])
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, t: scaled.append(t.detach()) or real_scale(self, t))
    evaluate(tiny_config(tiny_copy.out_dir, "evaluate.epochs=1", "evaluate.batch_size=5", "evaluate.accumulate=3"))
    ratios = [float(s / loss.detach()) for s, loss in zip(scaled, losses)]
    assert ratios == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0], rel=1e-6)


# ----------------------------------------------------------------------------- silent wrong data


def test_sixteen_bit_pngs_are_not_saturated(builtin_tree, tmp_path):
    root = make_tree(builtin_tree, tmp_path / "data", ["cat", "dog"], 4, 2)
    first = sorted((root / "train" / "cat").iterdir())[0]
    grey8 = np.asarray(Image.open(first).convert("L"))
    Image.fromarray(grey8.astype(np.uint16) * 257).save(first.with_suffix(".png"))  # the same picture, 16 bits
    first.unlink()
    cfg = tiny_config(
        tmp_path / "out",
        "data.source=imagefolder",
        f"data.path={root}",
        "data.resolution=32",
        "data.train_per_class=null",
        "data.test_per_class=null",
    )
    prepare(cfg)
    folder = Layout.of(cfg).stage("prepare")
    sources = [line.split("\t")[2] for line in (folder / "files.tsv").read_text().splitlines()[1:] if line.startswith("train")]
    cached = np.load(folder / "train_images.npy")[sources.index(first.with_suffix(".png").relative_to(root).as_posix())]
    assert (cached == 255).mean() < 0.5 and np.array_equal(cached[..., 0], grey8)


def test_a_folder_dataset_is_not_silently_cifar10_at_32_px(builtin_tree, tmp_path):
    root = make_tree(builtin_tree, tmp_path / "pets", ["cat", "dog"], 4, 2)
    for path in root.rglob("*.jpg"):  # 48-px images
        with Image.open(path) as img:
            img.resize((48, 48)).save(path)
    cfg = load_config(
        None, None, [f"out_dir={tmp_path / 'out'}", "tracking.enabled=false", "data.source=imagefolder", f"data.path={root}"]
    )
    prepare(cfg)
    manifest = yaml.safe_load((Layout.of(cfg).stage("prepare") / "manifest.json").read_text())
    assert (manifest["name"], manifest["resolution"]) == ("pets", 48)
