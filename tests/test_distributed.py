"""Data-parallel stages: the rank arithmetic, and relabel/evaluate under torchrun with Gloo on CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fadrm.io import read_json
from fadrm.stage import Layout
from fadrm.stages.evaluate import evaluate, rank_part
from fadrm.stages.relabel import relabel

from .conftest import tiny_config


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("size", [10, 7, 1])
def test_rank_parts_average_to_the_mean_of_the_micro_batch(world, size):
    pos = np.arange(20, 20 + size)
    per_view = torch.rand(size, generator=torch.Generator().manual_seed(size))
    parts = [rank_part(pos, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate([p for p, _ in parts]), pos)  # every view once, in order
    # what DDP computes: the mean over ranks of (share x the rank's mean loss)
    averaged = sum(share * per_view[p - 20].mean() for p, share in parts if len(p)) / world
    assert averaged.item() == pytest.approx(per_view.mean().item(), rel=1e-6)


def _torchrun(stage: str, cfg_dir: Path, cwd: Path, *overrides: str):
    torchrun = Path(sys.executable).parent / "torchrun"
    args = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29600 + os.getpid() % 300),
        "-m",
        "fadrm",
        stage,
        "--preset",
        "tiny",
        "--no-track",
        "-S",
        f"out_dir={cfg_dir}",
        "-S",
        "tracking.enabled=false",
    ]
    for o in overrides:
        args += ["-S", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FADRM_PROGRESS": "0"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_relabel_and_evaluate_under_torchrun_match_one_process(tiny_copy, tmp_path):
    cfg = tiny_config(tiny_copy.out_dir, "evaluate.epochs=4")
    layout = Layout.of(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1): the same arithmetic
    try:
        relabel(cfg)
        single_labels = load_file(str(layout.stage("relabel") / "labels.safetensors"))
        single = evaluate(cfg)
    finally:
        torch.set_num_threads(threads)
    shutil.rmtree(layout.stage("relabel"))
    _torchrun("relabel", tiny_copy.out_dir, tmp_path)
    labels = load_file(str(layout.stage("relabel") / "labels.safetensors"))
    assert labels.keys() == single_labels.keys()
    assert all(torch.equal(labels[k], single_labels[k]) for k in labels)  # epochs split over ranks, same bytes
    assert read_json(layout.metrics("relabel"))["world_size"] == 2
    _torchrun("evaluate", tiny_copy.out_dir, tmp_path, "evaluate.epochs=4")
    metrics = read_json(layout.metrics("evaluate"))
    assert metrics["world_size"] == 2 and single["world_size"] == 1
    assert metrics["epochs"] == 4 and 0 <= metrics["top1"] <= 1
    assert not layout.partial("relabel").exists()
