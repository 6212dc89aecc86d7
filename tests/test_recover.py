"""Recovery (data residual matching) against an independent reference of FADRM.md's formulas.

The teachers here are built so that the augmentation cannot change their output: 1x1
convolutions, BatchNorm and a global average are blind to any rearrangement of pixels, and
a crop of scale (1, 1) is the whole image. A flip or a circular shift is such a
rearrangement, so the loss of a recovery view equals the loss of the image itself, and the
reference below can follow the formulas without drawing views. Every part of the method
(Adam's betas, the cosine step size across stages, one teacher per step in turn, the CE and
BN terms with the first layer's weight, the clamp, the residual merge with alpha, the
resolution schedule) then has an exactly computable effect on the result.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fadrm.config import RecoverConfig
from fadrm.errors import ConfigError
from fadrm.losses import BNStatsLoss
from fadrm.methods import METHODS
from fadrm.stages import recover as recover_module
from fadrm.stages.recover import Teacher, recover_batch

LOW, HIGH = -1.5, 1.5
LABELS = torch.tensor([0, 1, 2, 1])


class PixelBlind(nn.Module):
    """conv1x1 - BN - ReLU - conv1x1 - BN - ReLU - global mean - linear: ignores pixel order."""

    def __init__(self, seed: int, classes: int = 3, width: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(3, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
            for bn in (self.bn1, self.bn2):  # running statistics the images do not have yet
                bn.running_mean.copy_(torch.randn(width, generator=g))
                bn.running_var.copy_(torch.rand(width, generator=g) * 2 + 0.5)
        self.eval().requires_grad_(False)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def teachers(n: int = 2, first_weight: float = 10.0) -> list[Teacher]:
    return [Teacher(f"t{i}", m, BNStatsLoss(m, first_weight)) for i, m in enumerate(PixelBlind(s) for s in range(n))]


def images(size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed)).clamp(LOW, HIGH)


def run(x_init, rc: RecoverConfig, ts=None, merges=True, seed=0):
    bounds = (torch.full((1, 3, 1, 1), LOW), torch.full((1, 3, 1, 1), HIGH))
    return recover_batch(
        x_init,
        LABELS,
        ts if ts is not None else teachers(),
        rc.schedule,
        rc,
        merges=merges,
        bounds=bounds,
        jitter_limit=3,
        crop_scale=(1.0, 1.0),
        precision="fp32",
        rng=np.random.default_rng(seed),
    )


# ----------------------------------------------------------------------------- the reference


def bn_statistics_loss(model: PixelBlind, x: torch.Tensor, first_weight: float) -> torch.Tensor:
    """sum_l w_l (||mu_l - mu^_l||_2 + ||var_l - var^_l||_2), w_1 = first_weight, written out."""
    a = model.conv1(x)
    b = model.conv2(F.relu(model.bn1(a)))
    total = 0.0
    for weight, inp, bn in ((first_weight, a, model.bn1), (1.0, b, model.bn2)):
        mu = inp.mean((0, 2, 3))
        var = ((inp - mu.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
        total = total + weight * ((mu - bn.running_mean).norm() + (var - bn.running_var).norm())
    return total


def reference(x_init, models, schedule, lr0, alpha, ce_weight, bn_weight, first_weight):
    """FADRM.md's recovery, step by step, with Adam written out (betas (0.5, 0.9), eps 1e-8)."""
    total = sum(iters for _, iters in schedule)
    resize = lambda t, s: t if t.shape[-1] == s else F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False)  # noqa: E731
    x = resize(x_init, schedule[0][0])
    t = 0
    for k, (_, iters) in enumerate(schedule):  # x is already at this stage's resolution
        m = torch.zeros_like(x)
        v = torch.zeros_like(x)
        for n in range(1, iters + 1):
            lr = lr0 * (1 + math.cos(math.pi * t / total)) / 2
            model = models[t % len(models)]
            xg = x.detach().requires_grad_(True)
            loss = ce_weight * F.cross_entropy(model(xg), LABELS) + bn_weight * bn_statistics_loss(model, xg, first_weight)
            (g,) = torch.autograd.grad(loss, xg)
            m = 0.5 * m + 0.5 * g
            v = 0.9 * v + 0.1 * g * g
            step = lr * (m / (1 - 0.5**n)) / ((v / (1 - 0.9**n)).sqrt() + 1e-8)
            x = (x - step).clamp(LOW, HIGH)
            t += 1
        if k + 1 < len(schedule):
            nxt = schedule[k + 1][0]
            a = alpha[k] if isinstance(alpha, tuple) else alpha  # a schedule: one weight per merge
            x = a * resize(x, nxt) + (1 - a) * resize(x_init, nxt)
    return x


CASES = {
    "multi-resolution": dict(schedule=((16, 4), (32, 5)), lr=0.2, alpha=0.3, ce_weight=1.0, bn_weight=0.05),
    "four-stages": dict(schedule=((32, 3),) * 4, lr=0.1, alpha=0.5, ce_weight=1.0, bn_weight=0.02),
    "bn-only": dict(schedule=((32, 6), (32, 6)), lr=0.05, alpha=0.6, ce_weight=0.0, bn_weight=1.0),
    "ce-only": dict(schedule=((32, 6), (32, 6)), lr=0.05, alpha=0.6, ce_weight=1.0, bn_weight=0.0),
    "alpha-schedule": dict(schedule=((32, 3),) * 4, lr=0.1, alpha=(0.9, 0.2, 0.6), ce_weight=1.0, bn_weight=0.02),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recover_batch_follows_the_reference(case):
    kw = CASES[case]
    rc = RecoverConfig(first_bn_weight=10.0, log_every=1, **kw)
    x_init = images()
    ts = teachers(2)
    got, log = run(x_init, rc, ts)
    want = reference(x_init, [t.model for t in ts], kw["schedule"], kw["lr"], kw["alpha"], kw["ce_weight"], kw["bn_weight"], 10.0)
    assert got.shape == want.shape == x_init.shape
    # Adam divides by the gradient's size, so a pixel whose gradient is ~0 can differ in rounding by up to
    # ~1e-4; a changed beta, step size or weight moves the images by 0.05 or more (see the test below).
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)
    assert len(log) == sum(iters for _, iters in kw["schedule"])


def test_the_reference_tells_the_betas_and_the_schedule_apart():
    """The cases above are sensitive: other betas, a constant step or no BN weight give other images."""
    kw = CASES["multi-resolution"]
    x_init, ts = images(), teachers(2)
    rc = RecoverConfig(first_bn_weight=10.0, **kw)
    got, _ = run(x_init, rc, ts)
    other = reference(x_init, [t.model for t in ts], kw["schedule"], kw["lr"], kw["alpha"], kw["ce_weight"], kw["bn_weight"], 1.0)
    assert (got - other).abs().max() > 1e-2


# ----------------------------------------------------------------------------- one part at a time


def test_the_merge_with_alpha_zero_returns_the_real_images():
    """After a merge with alpha = 0 the images are their initialisation again, exactly."""
    x_init = images()
    rc = RecoverConfig(schedule=((32, 5), (32, 0)), lr=0.3, alpha=0.0)
    out, _ = run(x_init, rc)
    assert torch.equal(out, x_init)
    moved, _ = run(x_init, rc, merges=False)  # SRe2L: no merge, the images keep what they learned
    assert (moved - x_init).abs().max() > 0.1


@pytest.mark.parametrize("alpha", [1.0, 0.25, 0.8])
def test_the_merge_moves_the_images_by_alpha(alpha):
    """x <- alpha x + (1 - alpha) init between stages: a known point between the two."""
    x_init = images()
    first, _ = run(x_init, RecoverConfig(schedule=((32, 5),), lr=0.3))
    merged, _ = run(x_init, RecoverConfig(schedule=((32, 5), (32, 0)), lr=0.3, alpha=alpha))
    torch.testing.assert_close(merged, alpha * first + (1 - alpha) * x_init, rtol=0, atol=1e-6)


def test_an_alpha_schedule_gives_each_merge_its_own_weight():
    """The k-th weight of ``recover.alpha: [...]`` is the k-th merge's: a merge with weight 0 resets the images to
    their initialisation, so what the earlier merges did cannot show after it, and the later ones still can."""
    x_init = images()
    sched = ((32, 3),) * 4
    last_resets, _ = run(x_init, RecoverConfig(schedule=sched, lr=0.3, alpha=(1.0, 1.0, 0.0)))
    all_reset, _ = run(x_init, RecoverConfig(schedule=sched, lr=0.3, alpha=(0.0, 0.0, 0.0)))
    first_resets, _ = run(x_init, RecoverConfig(schedule=sched, lr=0.3, alpha=(0.0, 1.0, 1.0)))
    torch.testing.assert_close(last_resets, all_reset, rtol=0, atol=1e-6)
    assert (first_resets - all_reset).abs().max() > 0.05
    constant, _ = run(x_init, RecoverConfig(schedule=sched, lr=0.3, alpha=0.4))
    listed, _ = run(x_init, RecoverConfig(schedule=sched, lr=0.3, alpha=(0.4, 0.4, 0.4)))
    assert torch.equal(constant, listed)


@pytest.mark.parametrize("alpha", [(0.5, 0.5), (0.5, 0.5, 0.5, 0.5), ()])
def test_an_alpha_schedule_must_name_one_weight_per_merge(alpha):
    rc = RecoverConfig(schedule=((32, 3),) * 4, alpha=alpha)
    with pytest.raises(ConfigError, match=f"lists {len(alpha)} merge weights .* 4 stages, so 3 merges"):
        recover_module.resolve_schedule(rc, 32, METHODS["fadrm"])
    with pytest.raises(ConfigError, match="merge weights"):
        run(images(), rc)
    assert recover_module.resolve_schedule(rc, 32, METHODS["sre2l"]) == ((32, 12),)  # no merges: nothing to weigh


def test_the_merge_resizes_the_initialisation_to_the_next_resolution():
    x_init = images(32)
    out, _ = run(x_init, RecoverConfig(schedule=((16, 3), (32, 0)), lr=0.3, alpha=0.0))
    assert torch.equal(out, x_init)  # the 32-px real image, not an up-sampled 16-px copy


def test_each_stage_runs_at_its_resolution_with_a_fresh_optimizer(monkeypatch):
    shapes: list[int] = []
    ts = teachers(2)
    for t in ts:
        t.model.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape[-1]))
    made = []
    real_adam = torch.optim.Adam

    def adam(params, **kw):
        made.append(kw)
        return real_adam(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", adam)
    run(images(), RecoverConfig(schedule=((16, 2), (24, 3), (32, 1)), lr=0.1), ts)
    assert shapes == [16, 16, 24, 24, 24, 32]
    assert len(made) == 3 and all(kw["betas"] == (0.5, 0.9) for kw in made)


def test_the_step_size_follows_the_cosine_across_stages(monkeypatch):
    """lr_t = lr0 (1 + cos(pi t / T)) / 2 with t counted over all stages."""
    seen: list[float] = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    run(images(), RecoverConfig(schedule=((16, 3), (32, 5)), lr=0.4))
    want = [0.4 * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(8)]
    assert seen == pytest.approx(want, rel=1e-12)


def test_teachers_take_turns_one_per_step():
    calls: list[str] = []
    ts = teachers(3)
    for t in ts:
        t.model.register_forward_hook(lambda m, i, o, name=t.name: calls.append(name))
    run(images(), RecoverConfig(schedule=((32, 4), (32, 3)), lr=0.1), ts)
    assert calls == ["t0", "t1", "t2", "t0", "t1", "t2", "t0"]


@pytest.mark.parametrize("term", ["bn", "ce"])
def test_each_loss_term_alone_moves_the_images_and_is_logged(term):
    rc = RecoverConfig(
        schedule=((32, 8),), lr=0.05, log_every=1, ce_weight=1.0 if term == "ce" else 0.0, bn_weight=1.0 if term == "bn" else 0.0
    )
    x_init = images()
    out, log = run(x_init, rc, teachers(1))
    assert (out - x_init).abs().max() > 0.05
    losses = [row[1] for row in log]
    parts = [row[2] if term == "ce" else row[3] for row in log]
    assert losses == pytest.approx(parts, rel=1e-6)  # the logged loss is that term and nothing else
    assert parts[-1] < parts[0]  # and recovery lowers it


def test_the_first_bn_layer_weight_changes_the_loss():
    x = images()
    rc = RecoverConfig(schedule=((32, 1),), lr=0.05, log_every=1, ce_weight=0.0, bn_weight=1.0)
    _, heavy = run(x, rc, teachers(1, first_weight=10.0))
    _, plain = run(x, rc, teachers(1, first_weight=1.0))
    model = teachers(1)[0].model
    first = bn_statistics_loss(model, x, 1.0) - bn_statistics_loss(model, x, 0.0)
    assert heavy[0][3] - plain[0][3] == pytest.approx(9 * first.item(), rel=1e-4)


def test_images_stay_in_the_valid_pixel_range():
    out, _ = run(images(), RecoverConfig(schedule=((32, 10),), lr=5.0))
    assert out.min() >= LOW and out.max() <= HIGH
    assert (out == HIGH).any() or (out == LOW).any()  # a large step reached the bound and was held there


# ----------------------------------------------------------------------------- the stage wires it up


def test_the_stage_hands_the_config_to_recover_batch(tiny_copy, monkeypatch):
    """What the recover stage passes down: the resolved schedule, alpha, the BN weights, merges."""
    from .conftest import tiny_config

    cfg = tiny_config(
        tiny_copy.out_dir,
        "recover.alpha=0.35",
        "recover.first_bn_weight=7.0",
        "recover.bn_weight=0.03",
        "recover.ce_weight=0.5",
        "recover.lr=0.07",
    )
    calls = []
    real = recover_module.recover_batch

    def spy(x_init, targets, ts, schedule, rc, **kw):
        calls.append((schedule, rc, kw, [t.bn.first_weight for t in ts]))
        return real(x_init, targets, ts, schedule, rc, **kw)

    monkeypatch.setattr(recover_module, "recover_batch", spy)
    recover_module.recover(cfg)
    assert calls
    for schedule, rc, kw, first_weights in calls:
        assert schedule == ((24, 8), (32, 8)) and rc == cfg.recover
        assert kw["merges"] is True and kw["precision"] == "fp32" and first_weights == [7.0]


# ----------------------------------------------------------------------------- re-chosen anchors


def test_nearest_anchor_is_the_closest_candidate_at_the_current_resolution():
    from fadrm.stages.recover import nearest_anchor

    x = images(16)
    far, near = torch.full((4, 3, 32, 32), 5.0), recover_module.resize(x, 32) + 0.01
    anchors = torch.stack([far, near, -far], dim=1)
    assert torch.equal(nearest_anchor(x, anchors), near)


def test_a_merge_with_anchors_pulls_towards_the_nearest_one():
    """alpha = 0: after the merge each image is exactly the candidate nearest to what stage 1 made."""
    x_init = images()
    first, _ = run(x_init, RecoverConfig(schedule=((32, 5),), lr=0.3))
    decoy = first + 0.05 * torch.randn_like(first)  # a 'real patch' close to where recovery went
    anchors = torch.stack([x_init, decoy, -decoy], dim=1)
    bounds = (torch.full((1, 3, 1, 1), LOW), torch.full((1, 3, 1, 1), HIGH))
    rc = RecoverConfig(schedule=((32, 5), (32, 0)), lr=0.3, alpha=0.0)
    out, _ = recover_batch(
        x_init,
        LABELS,
        teachers(),
        rc.schedule,
        rc,
        merges=True,
        bounds=bounds,
        jitter_limit=3,
        crop_scale=(1.0, 1.0),
        precision="fp32",
        rng=np.random.default_rng(0),
        anchors=anchors,
    )
    assert torch.equal(out, decoy)


def test_select_keeps_an_anchor_pool_and_recover_uses_it(tiny_copy):
    from safetensors.torch import load_file

    from fadrm.data.prepared import Prepared
    from fadrm.distilled import load_set
    from fadrm.stage import Layout
    from fadrm.stages.select import select

    from .conftest import tiny_config

    cfg = tiny_config(tiny_copy.out_dir, "select.anchor_pool=5", "recover.anchor=nearest")
    layout = Layout.of(cfg)
    select(cfg)
    pool = load_file(str(layout.stage("select") / "anchors.safetensors"))["pixels"]
    assert pool.shape == (10, 5, 3, 32, 32) and pool.dtype == torch.uint8
    init, labels, _ = load_set(layout.stage("select"))
    data = Prepared(layout.stage("prepare"))
    plan = recover_module.Recovery(cfg, layout, torch.device("cpu"), data, init, labels)
    idx = np.array([0, 7, 13])
    candidates = plan.batch_anchors(idx)
    assert candidates.shape == (3, 6, 3, 32, 32)
    for row, i in enumerate(idx):  # its own real patch first, then the pool of its own class
        torch.testing.assert_close(candidates[row, 0], data.to_input(init[i : i + 1], torch.device("cpu"))[0])
        torch.testing.assert_close(candidates[row, 1:], data.to_input(pool[labels[i]], torch.device("cpu")))
    plan.close()
    assert recover_module.recover(cfg)["images"] == len(init)


def test_a_spread_pick_takes_patches_from_easy_to_hard(tiny_copy):
    """select.pick=spread: the same scored candidates as the RDED pick, but ranks evenly spaced
    from the best to the worst instead of the best IPC."""
    from fadrm.distilled import load_set
    from fadrm.stage import Layout
    from fadrm.stages.select import select, spread

    from .conftest import tiny_config

    assert spread(300, 10) == [0, 33, 66, 100, 133, 166, 199, 233, 266, 299] and spread(7, 1) == [0]
    scores = {}
    for pick in ("top", "spread"):
        cfg = tiny_config(tiny_copy.out_dir, f"select.pick={pick}")
        select(cfg)
        _, _, manifest = load_set(Layout.of(cfg).stage("select"))
        scores[pick] = [[p["score"] for p in e["patches"]][0] for e in manifest["images"]]
    top, wide = np.reshape(scores["top"], (10, 2)), np.reshape(scores["spread"], (10, 2))  # ipc 2, 20 candidates
    assert np.array_equal(top[:, 0], wide[:, 0])  # rank 0: the best patch either way
    assert (wide[:, 1] > top[:, 1]).all()  # the other is the worst of 20, not the second best
    for method, same in (("fadrm", "spread"), ("rded", "top")):  # auto: RDED keeps its own definition
        cfg = tiny_config(tiny_copy.out_dir, f"method={method}", "select.pick=auto")
        select(cfg)
        _, _, manifest = load_set(Layout.of(cfg).stage("select"))
        assert [[p["score"] for p in e["patches"]][0] for e in manifest["images"]] == scores[same], method


def _grouped_plan(tiny_copy, *overrides):
    """select on the tiny dataset, then a recovery plan (difficulty groups prepared) over its set."""
    from fadrm.data.prepared import Prepared
    from fadrm.distilled import load_set
    from fadrm.stage import Layout
    from fadrm.stages.select import select

    from .conftest import tiny_config

    cfg = tiny_config(tiny_copy.out_dir, *overrides, "recover.iterations=3")
    layout = Layout.of(cfg)
    select(cfg)
    init, labels, _ = load_set(layout.stage("select"))
    plan = recover_module.Recovery(cfg, layout, torch.device("cpu"), Prepared(layout.stage("prepare")), init, labels)
    return cfg, plan, init, labels


def test_difficulty_groups_match_each_image_to_real_images_as_hard_as_it(tiny_copy):
    """recover.bn_groups (PSM): loss quantiles of real training images split them into groups with
    their own BN statistics; each synthetic image is put in the group of its initialisation's loss,
    the group sizes are in the metrics, and the recovered images differ from one global statistic."""
    from fadrm.distilled import load_set
    from fadrm.stage import Layout

    from .conftest import tiny_config

    cfg, plan, init, labels = _grouped_plan(tiny_copy, "recover.bn_groups=3")
    layout, data = Layout.of(cfg), plan.data
    teacher = plan.teachers[0]
    low, high = plan.thresholds[teacher.name].tolist()
    assert 0 < low < high  # tertiles of the teacher's loss on real images
    means = teacher.bn._targets[0][0]
    assert means.shape[0] == 3 and not torch.allclose(means[0], means[2])  # easy and hard images differ
    x = data.to_input(init, torch.device("cpu"))
    losses = plan._losses(teacher, x, torch.from_numpy(labels))
    ids = plan._groups_of(teacher, x, torch.from_numpy(labels))
    assert ids.tolist() == [0 if v <= low else 1 if v <= high else 2 for v in losses.tolist()]
    plan.close()
    grouped = recover_module.recover(cfg)
    assert grouped["bn_groups"] == 3 and sum(grouped["images_per_bn_group"][teacher.name]) == len(init)
    images = load_set(layout.stage("recover"))[0]
    plain = recover_module.recover(tiny_config(tiny_copy.out_dir, "recover.iterations=3"))
    assert "images_per_bn_group" not in plain
    assert not torch.equal(images, load_set(layout.stage("recover"))[0])


def test_rank_groups_split_a_batch_into_equal_shares_by_loss():
    losses = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.7, 0.4])
    assert recover_module.rank_groups(losses, 4).tolist() == [2, 0, 3, 1, 0, 3, 2, 1]
    assert recover_module.rank_groups(losses, 1).tolist() == [0] * 8


def test_rank_grouping_spreads_uniformly_easy_images_over_the_groups(tiny_copy):
    """recover.bn_group_by=rank: a set whose images all sit below the real images' first quantile
    (RDED's top pick on a strong teacher) still uses every group's statistics, in equal shares."""
    _, plan, init, labels = _grouped_plan(tiny_copy, "recover.bn_groups=2", "recover.bn_group_by=rank")
    teacher = plan.teachers[0]
    x, y = plan.data.to_input(init, torch.device("cpu")), torch.from_numpy(labels)
    losses = plan._losses(teacher, x, y)
    plan.thresholds[teacher.name] = torch.tensor([losses.max().item() + 1.0])  # every image "easier" than the median
    ids = plan._groups_of(teacher, x, y)
    plan.close()
    assert torch.bincount(ids, minlength=2).tolist() == [len(x) // 2, len(x) - len(x) // 2]
    assert (losses[ids == 0].max() <= losses[ids == 1].min()).item()  # the easier half is group 0
