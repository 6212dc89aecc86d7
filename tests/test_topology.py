"""Topology alignment (``recover.topology_weight``, after RETA's persistent-topology loss, components
only): the H0 persistence of a point cloud, the loss that matches a class's to real images', and
how recovery wires it in."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from fadrm.config import RecoverConfig
from fadrm.errors import ConfigError
from fadrm.losses import BNStatsLoss, FeatureTap, TopologyLoss, classifier_head, mst_lengths
from fadrm.models import create_model
from fadrm.stages import recover as recover_module
from fadrm.stages.recover import Teacher

from .test_recover import LABELS, PixelBlind, images, run


def kruskal(points: np.ndarray) -> list[float]:
    """The minimum spanning tree's edge lengths, by Kruskal over every pair (the reference)."""
    n = len(points)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    edges = sorted((float(np.linalg.norm(points[i] - points[j])), i, j) for i, j in itertools.combinations(range(n), 2))
    out = []
    for length, i, j in edges:
        a, b = root(i), root(j)
        if a != b:
            parent[a] = b
            out.append(length)
    return out


@pytest.mark.parametrize("n", [2, 3, 7, 12])
def test_h0_death_times_are_the_minimum_spanning_tree_edges(n):
    points = torch.randn(n, 5, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    got = mst_lengths(points)
    assert got.tolist() == pytest.approx(kruskal(points.numpy()), rel=1e-6)
    # a chain on a line: the tree joins neighbours, whatever the points' order
    line = torch.tensor([[3.0], [0.0], [1.0], [7.0]])
    assert mst_lengths(line).tolist() == pytest.approx([1.0, 2.0, 4.0])
    assert mst_lengths(points[:1]).numel() == 0


def test_the_death_times_carry_gradients_to_the_points():
    """Pulling two points of the shortest edge apart lengthens it: d/dx of that edge's length is its direction."""
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]], requires_grad=True)
    mst_lengths(points)[0].backward()  # the shortest edge, between points 0 and 1
    torch.testing.assert_close(points.grad, torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))


def _real_pool(classes: int = 2, per_class: int = 200, dim: int = 8) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {c: torch.randn(per_class, dim, generator=g) + 3 * c for c in range(classes)}


def test_a_collapsed_class_is_pulled_apart_to_the_real_spacing():
    """Ten features squeezed around one point (images pulled onto their anchors) have far shorter
    deaths than ten real ones; descending the loss spreads them out towards the target, and a real
    subset of the same size scores far lower than the collapsed set."""
    topology = TopologyLoss(_real_pool())
    labels = np.array([0] * 10 + [1] * 10)
    bound = topology.bind(labels)
    g = torch.Generator().manual_seed(1)
    collapsed = (torch.randn(20, 8, generator=g) * 0.01 + 3 * torch.from_numpy(labels)[:, None]).requires_grad_(True)
    real = torch.cat([topology.real[0][50:60], topology.real[1][50:60]])
    start = TopologyLoss.loss(collapsed, bound)
    assert TopologyLoss.loss(real, bound) < 0.1 * start
    target = topology.target(0, 10)
    optimizer = torch.optim.Adam([collapsed], lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        TopologyLoss.loss(collapsed, bound).backward()
        optimizer.step()
    assert TopologyLoss.loss(collapsed, bound) < 0.05 * start
    assert mst_lengths(collapsed[:10].detach()).sum() == pytest.approx(target.sum().item(), rel=0.1)


def test_the_targets_are_fixed_by_class_and_size_not_by_the_order_asked():
    pool = _real_pool()
    first, second = TopologyLoss(pool, seed=(3,)), TopologyLoss(pool, seed=(3,))
    a = first.target(1, 10)
    second.target(0, 10), second.target(0, 4)
    torch.testing.assert_close(second.target(1, 10), a)
    assert not torch.equal(TopologyLoss(pool, seed=(4,)).target(1, 10), a)  # the seed does choose the draws
    assert len(first.bind(np.array([0, 0, 1]))) == 1  # a class with one image in the batch has no topology


@pytest.mark.parametrize("arch", ["convnet", "resnet20", "resnet18"])
def test_the_features_are_what_the_classifier_head_reads(arch):
    model = create_model(arch, 10, 32).eval()
    tap = FeatureTap(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = tap.pop()
        tap.remove()
        torch.testing.assert_close(classifier_head(model)(features), logits)
        model(x)
    with pytest.raises(RuntimeError, match="no forward pass"):
        tap.pop()


def _topology_teacher() -> Teacher:
    model = PixelBlind(0)
    g = torch.Generator().manual_seed(5)
    real = {c: torch.randn(50, 6, generator=g).abs() * 2 for c in range(3)}
    return Teacher("t0", model, BNStatsLoss(model), FeatureTap(model), TopologyLoss(real))


def test_recovery_adds_the_weighted_topology_term_and_lowers_it():
    """With CE and BN weighted 0 the logged loss is the topology term alone (class 1 has two images
    in the batch): it is the weight times the loss of the teacher's features, and recovery lowers it."""
    rc = RecoverConfig(schedule=((32, 40),), lr=0.1, log_every=1, ce_weight=0.0, bn_weight=0.0, topology_weight=2.0)
    teacher = _topology_teacher()
    x = images()
    with torch.no_grad():
        teacher.model(x)
    teacher.bn.pop()
    expected = 2.0 * TopologyLoss.loss(teacher.tap.pop(), teacher.topology.bind(LABELS.numpy()))
    out, log = run(x, rc, [teacher])
    assert log[0][1] == pytest.approx(expected.item(), rel=1e-5)  # a pixel-blind teacher: the view is the image
    assert log[-1][1] < 0.8 * log[0][1]  # (the pixel range bounds how far two images' features can move)
    assert (out - x).abs().max() > 0.05
    off, log_off = run(x, rc.model_copy(update={"topology_weight": 0.0}), [_topology_teacher()])
    assert all(row[1] == 0 for row in log_off) and torch.equal(off, x)  # weight 0: the term is gone


def test_the_stage_builds_targets_from_real_views_and_changes_the_images(tiny_copy):
    """recover.topology_weight > 0 on the tiny preset: every teacher gets real features per class
    (recover.topology_images of them, or all a class has), and the recovered set differs from FADRM's."""
    from fadrm.data.prepared import Prepared
    from fadrm.distilled import load_set
    from fadrm.stage import Layout
    from fadrm.stages.select import select

    from .conftest import tiny_config

    cfg = tiny_config(tiny_copy.out_dir, "recover.iterations=3", "recover.topology_weight=5", "recover.topology_images=30")
    layout = Layout.of(cfg)
    init, labels, _ = load_set(layout.stage("select"))
    data = Prepared(layout.stage("prepare"))
    plan = recover_module.Recovery(cfg, layout, torch.device("cpu"), data, init, labels)
    teacher = plan.teachers[0]
    assert sorted(teacher.topology.real) == list(range(10))
    assert {tuple(f.shape) for f in teacher.topology.real.values()} == {(30, 64 * 16)}  # ConvNet-64's features
    plan.close()
    recover_module.recover(cfg)
    aligned = load_set(layout.stage("recover"))[0]
    recover_module.recover(tiny_config(tiny_copy.out_dir, "recover.iterations=3"))
    assert not torch.equal(aligned, load_set(layout.stage("recover"))[0])

    short = tiny_config(tiny_copy.out_dir, "ipc=3", "recover.batch_size=30", "recover.topology_weight=1", "recover.topology_images=2")
    select(short)
    init, labels, _ = load_set(layout.stage("select"))
    with pytest.raises(ConfigError, match="compares up to 3 images of a class"):
        recover_module.Recovery(short, Layout.of(short), torch.device("cpu"), data, init, labels)


def test_a_model_without_a_linear_head_is_named():
    with pytest.raises(ValueError, match="no linear classifier head"):
        classifier_head(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten()))
