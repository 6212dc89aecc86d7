"""The bare reference evaluator (benchmarks/bare_protocol.py): its RDED pick and a whole run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bare_protocol  # noqa: E402

MEAN, STD = 0.5, 0.25


class _PrefersTheMeanColour(nn.Module):
    """Class 0's logit is highest for inputs whose normalised mean is 0 (the dataset's mean colour)."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-10 * m**2, torch.zeros_like(m)], dim=1)


def _grey_images(levels) -> np.ndarray:
    return np.stack([np.full((16, 16, 3), v, dtype=np.uint8) for v in levels])


def _prepared(tmp_path, train: int, test: int) -> Path:
    """A prepared two-class dataset of random 32-px images, as `fadrm prepare` caches it."""
    rng = np.random.default_rng(0)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for split, n in (("train", train), ("test", test)):
        np.save(prepared / f"{split}_images.npy", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        np.save(prepared / f"{split}_labels.npy", np.arange(n) % 2)
    manifest = {"classes": ["a", "b"], "resolution": 32, "cached": True, "dataset_hash": "test", "mean": [MEAN] * 3, "std": [STD] * 3}
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    (prepared / "files.tsv").write_text("split\tpath\n")
    return prepared


def test_rded_pick_keeps_the_crops_the_teacher_finds_easiest():
    levels = [0, 30, 60, 90, 120, 128, 140, 170, 200, 250]  # 128 is the mean colour (0.5 * 255)
    train = (_grey_images(levels), np.zeros(len(levels), dtype=np.int64))

    def normalize(x):
        return (x - MEAN) / STD

    images, labels = bare_protocol.pick_rded(train, 2, 1, 0, _PrefersTheMeanColour(), normalize, candidates=10, crops=2)
    # scored on [0, 1] pixels, the two grey levels nearest the mean colour win (128, then 120)
    assert sorted(int(img.float().mean().round()) for img in images) == [120, 128]
    assert labels.tolist() == [0, 0]


def test_cutmix_pastes_one_box_from_other_images_of_the_batch():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 32, 32).contiguous()
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    mixed = bare_protocol.cutmix(x, gen)
    changed = (mixed != x).any(dim=1)  # (batch, H, W)
    assert changed.any()
    boxes = changed.any(dim=0)
    rows, cols = boxes.any(dim=1).nonzero().flatten(), boxes.any(dim=0).nonzero().flatten()
    # every changed pixel lies in one rectangle, the same for the whole batch
    assert boxes[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    for i in range(4):
        assert set(mixed[i][:, changed[i]].unique().tolist()) <= {0.0, 1.0, 2.0, 3.0} - {float(i)}


def test_a_run_records_each_cell_once_and_writes_the_table(tmp_path, monkeypatch):
    from fadrm.models import create_model
    from fadrm.weights import save_weights

    prepared = _prepared(tmp_path, train=40, test=20)
    teacher = tmp_path / "teacher.safetensors"
    save_weights(create_model("convnet", 2, 32), teacher, {"arch": "convnet", "top1": 0.5})
    records, report = tmp_path / "cells.json", tmp_path / "table.md"
    argv = ["bare_protocol.py", "--prepared", str(prepared), "--teacher", str(teacher), "--pick", "random", "rded"]
    argv += ["--ipc", "2", "--candidates", "10", "--seeds", "0", "--epochs", "1", "--records", str(records), "--report", str(report)]
    monkeypatch.setattr(sys, "argv", argv)
    bare_protocol.main()
    cells = json.loads(records.read_text())
    assert sorted(c["set"] for c in cells) == ["bare:random", "bare:rded"]
    assert all(0.0 <= c["top1"] <= 1.0 and len(c["curve"]) == 1 for c in cells)  # one epoch, tested once
    assert "| bare:rded | `teacher.safetensors` (50.0%) | rded |" in report.read_text()
    before = records.stat().st_mtime_ns
    bare_protocol.main()  # a rerun finds both cells done
    assert records.stat().st_mtime_ns == before
    records.with_suffix(".notes.md").write_text("What the figures say.\n")
    monkeypatch.setattr(sys, "argv", ["bare_protocol.py", "doc", "--records", str(records), "--report", str(report)])
    bare_protocol.main()  # re-rendered from the records, the hand-written notes under the table
    text = report.read_text()
    assert "| bare:random |" in text and text.rstrip().endswith("What the figures say.")


def test_a_device_that_is_not_here_is_a_clear_error(tmp_path, monkeypatch, capsys):
    prepared = _prepared(tmp_path, train=4, test=4)
    argv = ["bare_protocol.py", "--prepared", str(prepared), "--teacher", str(tmp_path / "t.safetensors"), "--device", "cuda:7"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        bare_protocol.main()
    assert stop.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
