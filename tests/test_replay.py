"""Soft labels belong to the pixels the student sees.

Relabel stores, per epoch and image, a view (crop box, flip, CutMix partner and box) and the
teachers' logits for it; evaluate replays the views and trains on those logits. Two checks,
each against a fresh teacher forward:

- the stored record, rendered by an independent reference (bilinear sampling written out in
  NumPy), gives the stored logits: the record says which pixels were labelled;
- the tensors evaluate feeds the student, put through the teacher, give the logits it trains
  on: evaluate replays exactly the labelled views (stored and online modes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fadrm.data.prepared import Prepared
from fadrm.distilled import load_set
from fadrm.stage import Layout
from fadrm.stages import evaluate as evaluate_module
from fadrm.stages.relabel import SoftLabels
from fadrm.teachers import load_teachers

from .conftest import tiny_config

CPU = torch.device("cpu")


def bilinear(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample a C x H x W image at rows ``ys`` x columns ``xs`` (pixel units, edges clamped)."""
    _, height, width = image.shape
    ys = np.clip(ys, 0, height - 1)
    xs = np.clip(xs, 0, width - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = image[:, y0][:, :, x0] * (1 - wx) + image[:, y0][:, :, x1] * wx
    bottom = image[:, y1][:, :, x0] * (1 - wx) + image[:, y1][:, :, x1] * wx
    return top * (1 - wy) + bottom * wy


def reference_view(image: np.ndarray, box, flip: bool, out: int) -> np.ndarray:
    """Random-resized crop ``box`` = (top, left, h, w) resized to ``out`` px, then mirrored if ``flip``."""
    top, left, h, w = (float(v) for v in box)
    centres = np.arange(out) + 0.5
    view = bilinear(image, top + centres * h / out - 0.5, left + centres * w / out - 0.5)
    return view[:, :, ::-1] if flip else view


def reference_views(images01: np.ndarray, views, positions: np.ndarray, out: int) -> np.ndarray:
    """Each record's crop, with its CutMix box filled from its partner record's crop."""
    rendered = []
    for p in positions:
        own = reference_view(images01[views.index[p]], views.box[p], bool(views.flip[p]), out)
        q = views.partner[p]
        top, left, h, w = views.mix[p]
        if h and w:
            pasted = reference_view(images01[views.index[q]], views.box[q], bool(views.flip[q]), out)
            own = own.copy()
            own[:, top : top + h, left : left + w] = pasted[:, top : top + h, left : left + w]
        rendered.append(own)
    return np.stack(rendered).astype(np.float32)


def test_stored_records_describe_the_labelled_pixels(tiny_run):
    cfg, _ = tiny_run
    layout = Layout.of(cfg)
    data = Prepared(layout.stage("prepare"))
    images, _, _ = load_set(layout.stage("recover"))
    labels = SoftLabels.open(layout.stage("relabel"), data, CPU, layout.stage("squeeze"))
    assert labels.stored
    ((_, teacher),) = load_teachers(layout.stage("squeeze"), data, CPU)
    images01 = images.numpy().astype(np.float64) / 255
    size = data.resolution
    mixed = flipped = 0
    for epoch in range(labels.epochs):
        views = labels.views(epoch)
        positions = np.arange(len(images))
        pixels = torch.from_numpy(reference_views(images01, views, positions, size))
        with torch.no_grad():
            fresh = teacher(data.normalize(pixels))
        stored = labels.logits(epoch, None, views, positions)
        torch.testing.assert_close(stored, fresh, rtol=2e-3, atol=1e-2)  # fp16 storage
        mixed += int((views.mix[:, 2] > 0).sum())
        flipped += int(views.flip.sum())
    assert mixed and flipped  # the check covered CutMix boxes and flips


def _capture(monkeypatch):
    """Record what evaluate feeds the student and the logits it learns them against."""
    fed: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    real_create, real_kl = evaluate_module.create_model, evaluate_module.soft_kl

    def create_model(*args, **kwargs):
        model = real_create(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a: fed.append(a[0].detach().clone()) if m.training else None)
        return model

    def soft_kl(student_logits, teacher_logits, temperature):
        targets.append(teacher_logits.detach().clone())
        return real_kl(student_logits, teacher_logits, temperature)

    monkeypatch.setattr(evaluate_module, "create_model", create_model)
    monkeypatch.setattr(evaluate_module, "soft_kl", soft_kl)
    return fed, targets


@pytest.mark.parametrize("mode", ["stored", "online"])
def test_the_student_trains_on_the_views_that_were_labelled(tiny_copy, monkeypatch, mode):
    from fadrm.stages.relabel import relabel

    cfg = tiny_config(tiny_copy.out_dir, f"relabel.mode={mode}", "evaluate.epochs=5")  # past the 3 recorded epochs
    if mode == "online":
        relabel(cfg)
    fed, targets = _capture(monkeypatch)
    evaluate_module.evaluate(cfg)
    layout = Layout.of(cfg)
    data = Prepared(layout.stage("prepare"))
    ((_, teacher),) = load_teachers(layout.stage("squeeze"), data, CPU)
    n = len(load_set(layout.stage("recover"))[0])
    assert len(targets) == 5 * -(-n // cfg.evaluate.batch_size), "one soft target per student batch"
    for x, target in zip(fed, targets):  # (fed also holds the FLOP count's forward pass, after training)
        with torch.no_grad():
            fresh = teacher(x)
        torch.testing.assert_close(target, fresh, rtol=2e-3, atol=1e-2)


def test_hard_labels_are_used_only_when_asked(tiny_copy, monkeypatch):
    fed, targets = _capture(monkeypatch)
    evaluate_module.evaluate(tiny_config(tiny_copy.out_dir, "evaluate.epochs=1", "evaluate.labels=hard"))
    assert fed and not targets


def test_top_k_storage_keeps_the_largest_logits_and_the_rest_of_the_mass():
    from fadrm.stages.relabel import decode, encode

    logits = torch.randn(50, 100, generator=torch.Generator().manual_seed(0)) * 3
    parts = encode(logits, 8)
    assert parts["values"].dtype == torch.float16 and parts["indices"].dtype == torch.int16
    restored = decode(parts, 100)
    top = logits.topk(8, dim=1)
    assert torch.equal(restored.topk(8, dim=1).indices.sort(1).values, top.indices.sort(1).values)
    torch.testing.assert_close(restored.gather(1, top.indices), top.values, rtol=1e-3, atol=1e-2)  # fp16
    # at temperature 1 the classes left out keep their probability mass, spread evenly
    mass = lambda z: torch.softmax(z, 1).scatter(1, top.indices, 0.0).sum(1)  # noqa: E731
    torch.testing.assert_close(mass(restored), mass(logits), rtol=1e-2, atol=1e-3)
    assert torch.equal(decode(encode(logits, None), 100), logits.half().float())


def test_relabel_with_top_k_is_smaller_and_trains(tiny_copy):
    from safetensors.torch import load_file

    from fadrm.io import read_json
    from fadrm.stages.relabel import relabel

    dense = read_json(Layout.of(tiny_copy).metrics("relabel"))
    cfg = tiny_config(tiny_copy.out_dir, "relabel.top_k=3", "evaluate.epochs=1")
    metrics = relabel(cfg)
    assert metrics["storage"] == "top3-fp16"
    assert metrics["bytes_per_image_epoch"] < dense["bytes_per_image_epoch"]
    stored = load_file(str(Layout.of(cfg).stage("relabel") / "labels.safetensors"))
    views = metrics["views"]
    assert sum(t.numel() * t.element_size() for t in stored.values()) == 14 * views  # 3 x (2 + 2) + 2 B, not 10 x 2
    assert 0 <= evaluate_module.evaluate(cfg)["top1"] <= 1
