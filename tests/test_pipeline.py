"""The stages end to end on the tiny preset: outputs, lineage, determinism, bad inputs."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from fadrm.data.prepared import Prepared
from fadrm.distilled import load_set
from fadrm.errors import ConfigError, DataError, MissingInputError
from fadrm.io import read_json
from fadrm.pipeline import run_pipeline, summary_table
from fadrm.stage import STAGE_ORDER, Layout, is_current
from fadrm.stages.evaluate import evaluate
from fadrm.stages.recover import recover
from fadrm.stages.relabel import relabel
from fadrm.stages.select import select

from .conftest import tiny_config


def test_tiny_run_end_to_end(tiny_run):
    cfg, summary = tiny_run
    layout = Layout.of(cfg)
    for key in ("teacher_top1", "student_top1", "student_top5", "recover_s_per_image"):
        assert summary[key] is not None
    assert summary["teacher_top1"] > 0.15  # 10 classes: chance is 0.10
    assert set(summary["stages"]) == set(STAGE_ORDER)
    for stage in summary["stages"].values():
        assert stage["seconds"] > 0 and stage["peak_mem_mb"] > 0
    for name in ("squeeze", "select", "recover", "relabel", "evaluate"):
        assert summary["stages"][name]["flops"] > 0 and summary["stages"][name]["flops_per_s"] > 0
    assert read_json(layout.summary) == summary
    for png in ("select/grid.png", "recover/grid.png", "recover/loss.png", "evaluate/accuracy.png"):
        assert (layout.root / png).stat().st_size > 1000
    table = summary_table(summary)
    assert "teacher top-1" in table and "recover" in table


def test_select_lineage_points_at_real_files(tiny_run):
    cfg, _ = tiny_run
    layout = Layout.of(cfg)
    manifest = read_json(layout.stage("select") / "manifest.json")
    data = Prepared(layout.stage("prepare"))
    sources = set(data.split("train").sources)
    assert len(manifest["images"]) == cfg.ipc * data.num_classes
    for entry in manifest["images"]:
        (patch,) = entry["patches"]  # factor 1 at 32 px
        assert patch["source"] in sources and patch["source"].split("/")[1] == entry["class"]
        top, left, h, w = patch["box"]
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32 and isinstance(patch["score"], float)
    # ranked: within a class, image 0 got the best (lowest cross-entropy) patch
    first = [e["patches"][0]["score"] for e in manifest["images"] if e["label"] == 0]
    assert first == sorted(first)
    recovered = read_json(layout.stage("recover") / "manifest.json")
    assert [e["patches"] for e in recovered["images"]] == [e["patches"] for e in manifest["images"]]


def test_stage_without_inputs_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path / "empty")
    with pytest.raises(MissingInputError, match=r"'recover' needs the output of 'prepare'.*fadrm prepare"):
        recover(cfg)
    assert not (tmp_path / "empty" / "recover").exists()


def test_ipc_larger_than_a_class(tiny_copy):
    cfg = tiny_config(tiny_copy.out_dir, "ipc=101", "method=random")
    with pytest.raises(DataError, match="ipc=101 but class 'airplane' has only 100"):
        select(cfg)
    cfg = tiny_config(tiny_copy.out_dir, "ipc=25")
    with pytest.raises(ConfigError, match="20 candidate images cannot give ipc x factor.2 = 25"):
        select(cfg)


def test_failed_stage_leaves_the_old_output_and_no_partial_folder(tiny_copy):
    layout = Layout.of(tiny_copy)
    before = sorted(p.name for p in (layout.stage("recover") / "images").rglob("*.png"))
    bad = tiny_config(tiny_copy.out_dir, "recover.schedule=[[32, 2], [16, 2]]")
    with pytest.raises(ConfigError, match="ends at 16 px"):
        recover(bad)
    assert sorted(p.name for p in (layout.stage("recover") / "images").rglob("*.png")) == before
    assert not [p for p in layout.root.iterdir() if ".tmp-" in p.name]


def test_same_seed_same_bits(tiny_copy, tmp_path):
    """Same seed, config and machine: bit-identical synthetic images and soft labels on CPU."""
    layout = Layout.of(tiny_copy)
    first_images = load_set(layout.stage("recover"))[0]
    first_labels = load_file(str(layout.stage("relabel") / "labels.safetensors"))
    for stage in (select, recover, relabel):
        stage(tiny_copy)
    assert torch.equal(load_set(layout.stage("recover"))[0], first_images)
    again = load_file(str(layout.stage("relabel") / "labels.safetensors"))
    assert all(torch.equal(first_labels[k], again[k]) for k in first_labels)
    other = tiny_config(tiny_copy.out_dir, "seed=1")
    select(other)
    recover(other)
    assert not torch.equal(load_set(layout.stage("recover"))[0], first_images)


def test_rerun_skips_current_stages_and_redoes_changed_ones(tiny_copy):
    layout = Layout.of(tiny_copy)
    assert all(is_current(s, tiny_copy, layout) for s in STAGE_ORDER)
    changed = tiny_config(tiny_copy.out_dir, "relabel.epochs=2")
    assert [s for s in STAGE_ORDER if not is_current(s, changed, layout)] == ["relabel", "evaluate"]
    seen = []
    run_pipeline(changed, announce=lambda s, status: seen.append((s, status)))
    assert ("squeeze", "up to date") in seen
    assert ("relabel", "running (params changed: relabel.epochs (3 -> 2))") in seen
    assert all(is_current(s, changed, layout) for s in STAGE_ORDER)


def test_the_executor_runs_exactly_the_stages_that_are_not_current(tiny_copy):
    """The hook the Prefect flow uses: run_pipeline decides which stages run, the executor only how."""
    calls = []

    def recording(name, run_stage):
        calls.append(name)
        metrics = run_stage()
        assert metrics["seconds"] > 0  # it got the stage's own metrics back
        return metrics

    run_pipeline(tiny_copy, execute=recording)
    assert calls == []  # everything current: nothing executed
    run_pipeline(tiny_config(tiny_copy.out_dir, "evaluate.epochs=2"), execute=recording)
    assert calls == ["evaluate"]
    run_pipeline(tiny_copy, force=True, until="select", execute=recording)
    assert calls == ["evaluate", "prepare", "squeeze", "select"]


def test_headline_is_the_short_dvc_view_of_the_summary(tiny_run):
    cfg, summary = tiny_run
    headline = read_json(Layout.of(cfg).headline)
    assert headline == {
        "student_top1_pct": round(100 * summary["student_top1"], 4),
        "teacher_top1_pct": round(100 * summary["teacher_top1"], 4),
        "recover_s_per_image": summary["recover_s_per_image"],
        "total_seconds": summary["total_seconds"],
    }
    assert (Layout.of(cfg).root / "efficiency.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["rded", "random", "sre2l", "fadrm+"])
def test_baselines_come_from_the_same_code(tiny_copy, method):
    cfg = tiny_config(tiny_copy.out_dir, f"method={method}")
    select(cfg)
    metrics = recover(cfg)
    manifest = read_json(Layout.of(cfg).stage("select") / "manifest.json")
    if method == "sre2l":
        assert manifest["init"] == "noise" and metrics["precision"] == "fp32" and metrics["schedule"] == [[32, 16]]
    elif method in ("rded", "random"):
        assert metrics["iterations"] == 0
        init, _, _ = load_set(Layout.of(cfg).stage("select"))
        assert torch.equal(load_set(Layout.of(cfg).stage("recover"))[0], init)
    else:
        assert metrics["teachers"] == ["0-convnet"]


def test_online_labels_and_hard_labels(tiny_copy):
    online = tiny_config(tiny_copy.out_dir, "relabel.mode=online", "evaluate.epochs=2")
    assert relabel(online)["bytes_total"] == 0
    assert not (Layout.of(online).stage("relabel") / "labels.safetensors").exists()
    metrics = evaluate(online)
    assert metrics["label_mode"] == "online" and 0 <= metrics["top1"] <= 1
    hard = tiny_config(tiny_copy.out_dir, "relabel.mode=online", "evaluate.labels=hard", "evaluate.epochs=2")
    assert evaluate(hard)["labels"] == "hard"


def test_stored_labels_are_compact(tiny_run):
    cfg, summary = tiny_run
    metrics = read_json(Layout.of(cfg).metrics("relabel"))
    # 10 fp16 logits (20 B) per image per epoch plus the file header; the views come from the recipe
    assert 20 < metrics["bytes_per_image_epoch"] < 25
    assert summary["relabel_bytes_per_image_epoch"] == metrics["bytes_per_image_epoch"]


def test_squeeze_resumes_from_its_checkpoint(tiny_copy, monkeypatch):
    from fadrm.stages import squeeze as squeeze_module

    cfg = tiny_config(tiny_copy.out_dir, "squeeze.epochs=2")
    layout = Layout.of(cfg)
    shutil.rmtree(layout.stage("squeeze"))
    calls = {"n": 0}
    original = squeeze_module._save_checkpoint

    def crash_after_first(*args, **kwargs):
        original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(squeeze_module, "_save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        squeeze_module.squeeze(cfg)
    assert not layout.stage("squeeze").exists() and (layout.partial("squeeze") / "0-convnet.ckpt").is_file()
    monkeypatch.setattr(squeeze_module, "_save_checkpoint", original)
    resumed = squeeze_module.squeeze(cfg)
    resumed_curve = read_json(layout.plot("squeeze_loss"))
    weights = load_file(str(layout.stage("squeeze") / "0-convnet.safetensors"))
    shutil.rmtree(layout.stage("squeeze"))
    straight = squeeze_module.squeeze(cfg)
    assert resumed["teacher_top1"] == straight["teacher_top1"]
    again = load_file(str(layout.stage("squeeze") / "0-convnet.safetensors"))
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    # the resumed run reports the whole training: both epochs' losses, all FLOPs, the seconds before the stop
    assert [r["epoch"] for r in resumed_curve] == [1, 2]
    assert resumed_curve == read_json(layout.plot("squeeze_loss"))
    assert resumed["flops"] == straight["flops"]
    assert 0 < resumed["resumed_seconds"] < resumed["seconds"]
    assert not layout.partial("squeeze").exists()  # checkpoints go once the output is published


@pytest.mark.slow
def test_recover_under_torchrun_equals_one_process(tiny_copy, tmp_path):
    """Two CPU processes (Gloo) share the recovery batches; the result is bit-identical."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg = tiny_config(tiny_copy.out_dir, "recover.batch_size=5")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers run (OMP_NUM_THREADS=1): same arithmetic
    try:
        recover(cfg)
    finally:
        torch.set_num_threads(threads)
    single = load_set(Layout.of(cfg).stage("recover"))[0]
    shutil.rmtree(Layout.of(cfg).stage("recover"))
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "--no-python",
            "fadrm",
            "recover",
            "--preset",
            "tiny",
            "--no-track",
            "-S",
            f"out_dir={tiny_copy.out_dir}",
            "-S",
            "recover.batch_size=5",
            "-S",
            "tracking.enabled=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"},  # noqa: E501
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert torch.equal(load_set(Layout.of(cfg).stage("recover"))[0], single)
    assert not Layout.of(cfg).partial("recover").exists()
