"""The teacher files kept in benchmarks/teachers/ are the ones behind docs/benchmarks.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fadrm.data.prepared import Prepared
from fadrm.engine import accuracy
from fadrm.io import sha256_file
from fadrm.models import create_model
from fadrm.stage import Layout
from fadrm.weights import load_weights, read_card

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = sorted((ROOT / "benchmarks" / "teachers").glob("*.safetensors"))
RECORDS = json.loads((ROOT / "docs" / "benchmarks" / "cifar10-cpu.json").read_text())


def test_teacher_files_are_kept():
    assert len(TEACHERS) >= 3, "benchmarks/teachers/ lost its weight files"


@pytest.mark.parametrize("path", TEACHERS, ids=[p.stem for p in TEACHERS])
def test_teacher_file_matches_its_card_and_the_records(path, tiny_run):
    card = read_card(path)
    assert card["file"] == path.name and sha256_file(path) == card["sha256"]
    # a record names each of its teachers (FADRM+ has several) by sha256 and by top-1, under one name
    behind = [r["teachers"][name] for r in RECORDS for name, sha in (r.get("teacher_sha256") or {}).items() if sha == card["sha256"]]
    assert behind, f"no record of docs/benchmarks/cifar10-cpu.json names {path.name}'s sha256"
    # the top-1 each record carries was measured again where its sets were made (bf16 on a GPU: +-0.0005)
    assert all(abs(t - card["top1"]) < 0.002 for t in behind)

    # the weights are a trained CIFAR-10 teacher: they classify the built-in subset's real test images
    cfg, _ = tiny_run
    data = Prepared(Layout.of(cfg).stage("prepare"))
    model = load_weights(create_model(card["arch"], card["num_classes"], card["resolution"]), path)
    top1, _ = accuracy(model, data.test_batches(250, torch.device("cpu")))
    assert top1 > card["top1"] - 0.1, f"{path.name}: {top1:.3f} on the built-in test images, card says {card['top1']}"
