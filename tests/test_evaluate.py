"""Student training (FADRM.md, evaluate): AdamW with weight decay on weights only, a cosine step
size per optimiser step, micro-batches accumulated into steps. The real optimiser runs; a
subclass only writes down what it was given and the step size of every step."""

from __future__ import annotations

import math

import pytest
import torch

from fadrm.distilled import load_set
from fadrm.engine import param_groups, warmup_cosine
from fadrm.models import ConvNet
from fadrm.stage import Layout
from fadrm.stages import evaluate as evaluate_module

from .conftest import tiny_config


class RecordingAdamW(torch.optim.AdamW):
    made: list[RecordingAdamW] = []

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.step_sizes: list[float] = []
        RecordingAdamW.made.append(self)

    def step(self, closure=None):
        self.step_sizes.append(self.param_groups[0]["lr"])
        return super().step(closure)


@pytest.mark.parametrize(
    "overrides, micro_per_step",
    [((), 1), (("evaluate.batch_size=5", "evaluate.accumulate=2", "evaluate.final_lr_fraction=0.5"), 2)],
)
def test_student_optimizer_steps_and_weight_decay(tiny_copy, monkeypatch, overrides, micro_per_step):
    cfg = tiny_config(tiny_copy.out_dir, "evaluate.epochs=4", "evaluate.lr=0.003", "evaluate.weight_decay=0.05", *overrides)
    students = []
    real_create = evaluate_module.create_model
    monkeypatch.setattr(evaluate_module, "create_model", lambda *a, **k: students.append(real_create(*a, **k)) or students[-1])
    RecordingAdamW.made = []
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    evaluate_module.evaluate(cfg)
    (optimizer,), (student,) = RecordingAdamW.made, students

    # weight decay on weights (rank >= 2) only; every parameter in exactly one group
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decay) == sum(1 for _ in student.parameters())
    for p in student.parameters():
        assert decay[id(p)] == (0.05 if p.ndim > 1 else 0.0)

    # one cosine over all optimiser steps, from lr to lr * final_lr_fraction
    n = len(load_set(Layout.of(cfg).stage("recover"))[0])
    steps_per_epoch = math.ceil(math.ceil(n / cfg.evaluate.batch_size) / micro_per_step)
    total = 4 * steps_per_epoch
    f = cfg.evaluate.final_lr_fraction
    want = [0.003 * (f + (1 - f) * (1 + math.cos(math.pi * s / total)) / 2) for s in range(total)]
    assert optimizer.step_sizes == pytest.approx(want, rel=1e-9)
    assert steps_per_epoch > 1  # so a schedule stepped per epoch would differ


def test_param_groups_split_by_rank():
    model = ConvNet(10, width=8)
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_cosine_values():
    assert warmup_cosine(0, 100) == 1.0
    assert warmup_cosine(50, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, final_fraction=0.25) == pytest.approx(0.25)
    assert warmup_cosine(0, 100, warmup=10) == pytest.approx(0.1)
    assert warmup_cosine(10, 110, warmup=10) == 1.0
