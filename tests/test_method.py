"""The pieces of the method, checked against their formulas (FADRM.md)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fadrm.augment import crop_boxes, render_views, resized_crop, sample_views
from fadrm.config import RecoverConfig
from fadrm.errors import ConfigError, DivergenceError
from fadrm.losses import BNStatsLoss, grouped_bn_statistics, soft_kl
from fadrm.methods import METHODS
from fadrm.models import ConvNet
from fadrm.stages.recover import (
    Teacher,
    cosine_lr,
    recover_batch,
    residual_merge,
    resize,
    resolve_schedule,
    teacher_for_step,
)


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))


def test_bn_loss_is_zero_at_the_running_statistics_and_grows_otherwise():
    net = _bn_net()
    x = torch.randn(64, 3, 12, 12) * 2 + 1
    net.train()
    for bn in (net[1], net[4]):
        bn.momentum = None  # cumulative average: after one pass, running stats = batch stats
    with torch.no_grad():
        net(x)
    net.eval()
    loss = BNStatsLoss(net, first_weight=10.0)
    net(x)
    at_running = loss.pop()
    # biased variance here vs the running (unbiased) estimate: zero up to n/(n-1)
    assert at_running.item() < 0.05
    net(x * 3 + 2)
    away = loss.pop()
    assert away.item() > 10 * at_running.item() + 1
    net(x * 5 + 4)
    assert loss.pop().item() > away.item()


def test_bn_loss_weights_the_first_layer():
    net = _bn_net().eval()
    x = torch.randn(8, 3, 12, 12)
    plain, weighted = BNStatsLoss(net, first_weight=1.0), None
    net(x)
    terms_sum = plain.pop()
    plain.remove()
    weighted = BNStatsLoss(net, first_weight=10.0)
    net(x)
    total = weighted.pop()
    # recompute the first term by hand
    inp = x
    first = net[0](inp)
    mu, var = first.mean((0, 2, 3)), first.var((0, 2, 3), unbiased=False)
    term1 = torch.linalg.vector_norm(mu - net[1].running_mean) + torch.linalg.vector_norm(var - net[1].running_var)
    assert torch.allclose(total - terms_sum, 9 * term1, atol=1e-5)


def test_bn_loss_without_bn_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    loss = BNStatsLoss(net)
    net(torch.randn(2, 3, 8, 8))
    assert loss.layers == [] and loss.pop() is None


def _moments(x):
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


def test_grouped_bn_statistics_are_each_groups_own_moments():
    """PSM's targets: per BN layer, the input's mean and variance over the images of each group,
    accumulated over batches; a group with no image falls back to the running statistics."""
    net = nn.Sequential(nn.BatchNorm2d(2)).eval()
    net[0].running_mean.fill_(7.0)
    net[0].running_var.fill_(3.0)
    torch.manual_seed(0)
    xs = [torch.randn(6, 2, 4, 4) * (1 + i) + i for i in range(2)]
    ids = [torch.tensor([0, 1, 0, 1, 1, 0]), torch.tensor([1, 1, 1, 0, 0, 1])]
    [(mean, var)] = grouped_bn_statistics(net, zip(xs, ids), groups=3)
    assert mean.shape == var.shape == (3, 2)
    everything, groups = torch.cat(xs), torch.cat(ids)
    for g in (0, 1):
        want_mean, want_var = _moments(everything[groups == g])
        torch.testing.assert_close(mean[g], want_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var[g], want_var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean[2], torch.full((2,), 7.0))
    torch.testing.assert_close(var[2], torch.full((2,), 3.0))


def test_grouped_bn_loss_matches_each_group_to_its_own_statistics():
    net = nn.Sequential(nn.BatchNorm2d(2)).eval()
    torch.manual_seed(0)
    x = torch.cat([torch.randn(3, 2, 4, 4), torch.randn(1, 2, 4, 4) * 3 + 2])
    ids = torch.tensor([0, 0, 0, 1])
    own = [_moments(x[:3]), _moments(x[3:])]
    loss = BNStatsLoss(net, first_weight=1.0)
    loss.use_groups([(torch.stack([own[0][0], own[1][0]]), torch.stack([own[0][1], own[1][1]]))])
    loss.set_groups(ids)
    net(x)
    assert loss.pop().item() < 1e-5  # every group sits on its own statistics
    swapped = [(torch.stack([own[1][0], own[0][0]]), torch.stack([own[1][1], own[0][1]]))]
    loss.use_groups(swapped)
    net(x)

    def distance(a, b):
        return torch.linalg.vector_norm(a[0] - b[0]) + torch.linalg.vector_norm(a[1] - b[1])

    want = 0.75 * distance(own[0], own[1]) + 0.25 * distance(own[1], own[0])  # weighted by the groups' shares
    torch.testing.assert_close(loss.pop(), want)
    loss.set_groups(None)  # back to the running statistics (the paper's loss)
    net(x)
    mean, var = _moments(x)
    torch.testing.assert_close(loss.pop(), distance((mean, var), (net[0].running_mean, net[0].running_var)))


def test_residual_merge_matches_the_formula():
    torch.manual_seed(0)
    x, init = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)
    merged = residual_merge(x, init, 0.3, 32)
    expected = 0.3 * nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) + 0.7 * init
    assert torch.equal(merged, expected)
    same = residual_merge(init, init * 0, 0.25, 32)
    assert torch.equal(same, 0.25 * init)
    assert resize(init, 32) is init


def test_cosine_schedule_values():
    assert cosine_lr(0, 100, 0.25) == 0.25
    assert math.isclose(cosine_lr(50, 100, 0.25), 0.125)
    assert math.isclose(cosine_lr(25, 100, 1.0), (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_lr(100, 100, 0.25) == 0.0


def test_teacher_round_robin_order():
    assert [teacher_for_step(t, 3) for t in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [teacher_for_step(t, 1) for t in range(3)] == [0, 0, 0]


def test_schedule_resolution():
    rc = RecoverConfig(schedule=((16, 5), (32, 7)))
    assert resolve_schedule(rc, 32, METHODS["fadrm"]) == ((16, 5), (32, 7))
    assert resolve_schedule(rc, 32, METHODS["sre2l"]) == ((32, 12),)  # one resolution, same budget
    assert resolve_schedule(RecoverConfig(iterations=500), 224, METHODS["fadrm"]) == ((200, 500), (224, 500)) * 2
    with pytest.raises(ConfigError, match="ends at 16 px but the dataset is 32 px"):
        resolve_schedule(RecoverConfig(schedule=((32, 5), (16, 5))), 32, METHODS["fadrm"])


def _teachers(n):
    out = []
    for i in range(n):
        torch.manual_seed(i)
        model = ConvNet(3, width=8).eval().requires_grad_(False)
        out.append(Teacher(f"t{i}", model, BNStatsLoss(model)))
    return out


def _recover(teachers, rc, x, merges=True, rng_seed=0):
    bounds = (torch.full((1, 3, 1, 1), -2.0), torch.full((1, 3, 1, 1), 2.0))
    return recover_batch(
        x,
        torch.tensor([0, 1, 2, 0]),
        teachers,
        rc.schedule,
        rc,
        merges=merges,
        bounds=bounds,
        jitter_limit=2,
        crop_scale=(0.08, 1.0),
        precision="fp32",
        rng=np.random.default_rng(rng_seed),
    )


def test_recover_batch_is_deterministic_clamped_and_uses_teachers_in_turn():
    teachers = _teachers(2)
    calls = []
    for t in teachers:
        t.model.register_forward_hook(lambda m, i, o, name=t.name: calls.append(name))
    rc = RecoverConfig(schedule=((16, 3), (32, 3)), lr=0.5, log_every=1)
    x = torch.randn(4, 3, 32, 32)
    out1, log1 = _recover(teachers, rc, x)
    assert calls == ["t0", "t1"] * 3
    out2, log2 = _recover(teachers, rc, x)
    assert torch.equal(out1, out2) and log1 == log2
    assert out1.shape == (4, 3, 32, 32) and out1.min() >= -2 and out1.max() <= 2
    assert [row[0] for row in log1] == list(range(6))
    assert not torch.equal(out1, x)


def test_recover_batch_divergence_names_the_iteration_and_images():
    teachers = _teachers(1)
    rc = RecoverConfig(schedule=((32, 4),), lr=0.1)
    x = torch.randn(4, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(DivergenceError, match=r"iteration 1/4 .*cat#7"):
        bounds = (torch.full((1, 3, 1, 1), -2.0), torch.full((1, 3, 1, 1), 2.0))
        recover_batch(
            x,
            torch.tensor([0, 1, 2, 0]),
            teachers,
            rc.schedule,
            rc,
            merges=True,
            bounds=bounds,
            jitter_limit=0,
            crop_scale=(0.5, 1.0),
            precision="fp32",
            rng=np.random.default_rng(0),
            names=["cat#7", "dog#1", "a#2", "b#3"],
        )


def test_crop_boxes_and_resized_crop():
    boxes = crop_boxes(200, 32, (0.08, 1.0), np.random.default_rng(0))
    assert (boxes[:, 2] > 0).all() and (boxes[:, 0] + boxes[:, 2] <= 32).all() and (boxes[:, 1] + boxes[:, 3] <= 32).all()
    x = torch.arange(16.0).view(1, 1, 4, 4)
    whole = resized_crop(x, torch.tensor([[0, 0, 4, 4]]), 4)
    assert torch.allclose(whole, x, atol=1e-5)  # the identity crop
    flipped = resized_crop(x, torch.tensor([[0, 0, 4, 4]]), 4, torch.tensor([True]))
    assert torch.allclose(flipped, x.flip(3), atol=1e-5)
    corner = resized_crop(x, torch.tensor([[2, 2, 2, 2]]), 2)
    assert torch.allclose(corner, x[:, :, 2:, 2:], atol=1e-5)


def test_views_are_a_pure_function_of_seed_and_epoch():
    a = sample_views(30, 32, 32, seed=1, epoch=4, batch_size=10, scale=(0.08, 1), cutmix=True)
    b = sample_views(30, 32, 32, seed=1, epoch=4, batch_size=10, scale=(0.08, 1), cutmix=True)
    c = sample_views(30, 32, 32, seed=1, epoch=5, batch_size=10, scale=(0.08, 1), cutmix=True)
    for field in ("index", "box", "flip", "partner", "mix"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.index, c.index)
    # CutMix partners stay within their batch of views
    assert all((a.partner[s : s + 10] // 10 == s // 10).all() for s in range(0, 30, 10))
    images = torch.rand(30, 3, 32, 32)
    pixels = render_views(images, a, np.arange(30), 32)
    assert pixels.shape == (30, 3, 32, 32)


def test_soft_kl_is_zero_for_equal_logits_and_positive_otherwise():
    z = torch.randn(5, 10)
    assert soft_kl(z, z, 4.0).abs().item() < 1e-6
    assert soft_kl(z, z.flip(1), 4.0).item() > 0


def test_methods_table():
    assert METHODS["sre2l"].init == "noise" and METHODS["sre2l"].fp32 and not METHODS["sre2l"].merges
    assert not METHODS["rded"].recover and METHODS["fadrm+"].all_teachers
