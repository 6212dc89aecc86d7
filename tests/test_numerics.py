"""The pieces that catch divergence where it starts (fadrm.numerics, the soft labels' checks, the
accumulation weights), one at a time; the stages' own refusals are in test_defects.py. The
fp16 tests need CUDA and run on a GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fadrm.device import configure_backends, to_device
from fadrm.engine import accumulation_weights
from fadrm.errors import DamagedInputError, DivergenceError
from fadrm.io import read_json, write_json
from fadrm.models import create_model
from fadrm.numerics import FiniteWatch, StepGuard
from fadrm.stage import Layout
from fadrm.stages.relabel import LABELS, RECIPE, SoftLabels

from .conftest import tiny_config


def _guarded_step(scale: float | None, gradient: float):
    p = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
    guard = StepGuard("test", optimizer, scaler, "lower test.lr")
    loss = (p * gradient).sum()
    scaler.scale(loss).backward()
    return p, scaler, guard.step("step 1")


def test_fp16_scaler_overflow_is_skipped_after_unscale_not_taken_for_divergence():
    # 1e12 x 2^126 overflows fp32: the scaler skips the step and halves its scale, as designed
    p, scaler, stepped = _guarded_step(2.0**126, 1e12)
    assert not stepped and torch.equal(p.detach(), torch.ones(3)) and scaler.get_scale() == 2.0**125
    # the same gradient, unscaled by a sane scale, steps
    p, _, stepped = _guarded_step(2.0**16, 1e12)
    assert stepped and not torch.equal(p.detach(), torch.ones(3))
    # an overflow that persists at scale 1, or any without loss scaling, is divergence
    with pytest.raises(DivergenceError, match="test: gradients became non-finite at step 1; lower test.lr"):
        _guarded_step(1.0, float("inf"))
    with pytest.raises(DivergenceError, match="gradients became non-finite"):
        _guarded_step(None, float("nan"))


def test_soft_labels_with_non_finite_values_are_refused_as_input(tiny_run, tmp_path):
    cfg, _ = tiny_run
    layout = Layout.of(cfg)
    folder = tmp_path / "relabel"
    folder.mkdir()
    write_json(folder / RECIPE, read_json(layout.stage("relabel") / RECIPE))
    from safetensors.torch import load_file

    stored = load_file(str(layout.stage("relabel") / LABELS))
    stored["logits"][1, 3, 2] = float("nan")
    save_file(stored, str(folder / LABELS))
    from fadrm.data.prepared import Prepared

    data = Prepared(layout.stage("prepare"))
    labels = SoftLabels.open(folder, data, torch.device("cpu"), layout.stage("squeeze"))
    labels.logits(0, None, labels.views(0), np.arange(0, 10))  # a clean slice reads fine
    with pytest.raises(DamagedInputError, match=r"soft labels in .* hold non-finite values \(epoch 2, views 0-9"):
        labels.logits(1, None, labels.views(1), np.arange(0, 10))


def test_online_soft_labels_from_a_broken_teacher_name_the_teacher(tiny_run):
    cfg, _ = tiny_run
    layout = Layout.of(cfg)
    from fadrm.data.prepared import Prepared

    data = Prepared(layout.stage("prepare"))
    recipe = {**read_json(layout.stage("relabel") / RECIPE), "mode": "online"}
    broken = create_model("convnet", 10, 32)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    labels = SoftLabels(recipe, data, torch.device("cpu"), teachers=[("0-convnet", broken.eval())])
    views = labels.views(0)
    with pytest.raises(DivergenceError, match=r"teacher 0-convnet gave non-finite logits \(epoch 1\).*rerun `fadrm squeeze`"):
        labels.logits(0, torch.rand(20, 3, 32, 32), views, np.arange(5), at="epoch 1")


def test_accumulation_weights_give_each_step_the_mean_over_its_samples():
    assert accumulation_weights([5, 5, 5, 5], 1) == [1.0] * 4
    assert accumulation_weights([5, 5, 5, 5], 2) == [0.5] * 4
    assert accumulation_weights([5, 5, 5, 5], 3) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])  # last group: 1 batch
    assert accumulation_weights([5, 5, 5, 3], 2) == pytest.approx([0.5, 0.5, 5 / 8, 3 / 8])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fp16 loss scaling)")


@cuda
def test_fp16_on_cuda_skips_scaler_overflow_and_stops_real_divergence():
    """Real fp16 autocast and loss scaling: the first steps overflow at the scaler's 65536 and are
    skipped (not taken for divergence); training then proceeds. A gradient that overflows with
    the scale already down at 1 is divergence."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    guard = StepGuard("test", optimizer, scaler, "lower test.lr")
    x, y = torch.randn(32, 64, device=device) * 30, torch.randint(0, 10, (32,), device=device)
    stepped = []
    for step in range(40):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y) * 2000  # a loss whose scaled gradient overflows fp16
        guard.check_loss(loss, f"step {step}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        stepped.append(guard.step(f"step {step}"))
    assert not stepped[0] and guard.skipped >= 1 and stepped[-1]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    w = nn.Parameter(torch.zeros(4, device=device))
    optimizer = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=1.0)
    guard = StepGuard("test", optimizer, scaler, "lower test.lr")
    scaler.scale(torch.sqrt(w * 0).sum()).backward()  # 0 * inf: NaN at any scale
    with pytest.raises(DivergenceError, match="gradients became non-finite"):
        guard.step("step 1")


@cuda
def test_fp16_pipeline_on_cuda_runs_and_a_diverging_teacher_stops(tmp_path):
    from fadrm.pipeline import run_pipeline

    fp16 = ["device=cuda", "squeeze.precision=fp16", "recover.precision=fp16", "relabel.precision=fp16", "evaluate.precision=fp16"]
    summary = run_pipeline(tiny_config(tmp_path / "ok", *fp16))
    assert summary["teacher_top1"] > 0.15 and summary["student_top1"] is not None
    with pytest.raises(DivergenceError, match=r"squeeze 0-convnet: .*lower squeeze.lr \(now 50\)"):
        run_pipeline(tiny_config(tmp_path / "bad", *fp16, "squeeze.lr=50"), until="squeeze")


def test_epoch_losses_are_judged_against_a_uniform_guess():
    from fadrm.numerics import check_epoch_loss

    check_epoch_loss(2.5, 10, "w", "epoch 1", "hint")  # near ln 10 = 2.30: a model that is still learning
    with pytest.raises(
        DivergenceError,
        match=r"w: training loss exploded to 1e\+04 by epoch 3 \(a uniform guess scores "
        r"ln 10 = 2.30\); hint",
    ):
        check_epoch_loss(1e4, 10, "w", "epoch 3", "hint")
    check_epoch_loss(5.0, 10, "w", "epoch 3", "hint")  # high, but it may still come down
    check_epoch_loss(4.0, 10, "w", "epoch 9", "hint", final=True)  # poor, not diverged: the regression check's job
    with pytest.raises(DivergenceError, match=r"training ended with loss 5, worse than a uniform guess"):
        check_epoch_loss(5.0, 10, "w", "epoch 9", "hint", final=True)
    with pytest.raises(DivergenceError, match="training loss became nan"):
        check_epoch_loss(float("nan"), 10, "w", "epoch 1", "hint")


def test_a_finite_watch_keeps_the_first_bad_step_on_the_device():
    watch = FiniteWatch(torch.device("cpu"))
    watch.loss(0, torch.tensor(1.5))
    watch.gradients(0, [torch.ones(3), None])
    assert watch.first() is None
    watch.loss(3, torch.tensor(2.0))
    watch.gradients(3, [torch.tensor([1.0, float("inf")])])  # finite loss, bad gradients: step 3
    watch.loss(4, torch.tensor(float("nan")))  # later trouble does not overwrite the first
    assert watch.first()[:2] == ("gradients", 3)
    other = FiniteWatch(torch.device("cpu"))
    other.loss(7, torch.tensor(float("inf")))
    other.loss(8, torch.tensor(float("nan")))
    assert other.first() == ("loss", 7, float("inf"))


class NanAfter(nn.Module):
    """A teacher whose logits turn NaN from its ``calls``-th forward on."""

    def __init__(self, calls: int):
        super().__init__()
        self.head, self.calls, self.seen = nn.Linear(3, 3), calls, 0

    def forward(self, x):
        self.seen += 1
        out = self.head(x.mean((2, 3)))
        return out * float("nan") if self.seen >= self.calls else out


def test_recovery_names_the_exact_bad_iteration_between_log_rows():
    """Without fp16 loss scaling the check is read only at log rows (every 10 steps here), and
    still names iteration 6, where the loss went NaN."""
    from fadrm.config import RecoverConfig
    from fadrm.losses import BNStatsLoss
    from fadrm.stages.recover import Teacher, recover_batch

    model = NanAfter(6).eval().requires_grad_(False)
    rc = RecoverConfig(schedule=((16, 8),), lr=0.1, log_every=10)
    with pytest.raises(DivergenceError, match=r"recover: loss became nan at iteration 6/8 \(stage 1, 16 px, teacher t\)"):
        recover_batch(
            torch.zeros(3, 3, 16, 16),
            torch.tensor([0, 1, 2]),
            [Teacher("t", model, BNStatsLoss(model))],
            rc.schedule,
            rc,
            merges=True,
            bounds=(torch.full((1, 3, 1, 1), -2.0), torch.full((1, 3, 1, 1), 2.0)),
            jitter_limit=0,
            crop_scale=(1.0, 1.0),
            precision="fp32",
            rng=np.random.default_rng(0),
        )
    assert model.seen == 8  # the steps after it ran on the device without a host check


def test_cudnn_autotunes_the_training_stages_only():
    before = torch.backends.cudnn.benchmark
    try:
        configure_backends(torch.device("cuda"), "squeeze")
        assert torch.backends.cudnn.benchmark
        configure_backends(torch.device("cuda"), "recover")
        assert not torch.backends.cudnn.benchmark
        configure_backends(torch.device("cuda"), "evaluate")
        configure_backends(torch.device("cpu"), "recover")  # CPU: cuDNN settings untouched
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before


def test_host_arrays_reach_the_device_unchanged():
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert torch.equal(to_device(a, torch.device("cpu")), torch.from_numpy(a))
    if torch.cuda.is_available():  # pinned, non-blocking: same values once the stream has run
        out = to_device(a, torch.device("cuda"))
        assert out.is_cuda and torch.equal(out.cpu(), torch.from_numpy(a))


def test_deferred_teacher_checks_name_the_first_broken_batch_when_read(tiny_run):
    """As on CUDA: logits() does not wait for the device; check() (once per epoch) raises for the
    first batch whose teacher output was not finite, naming the teacher and the batch."""
    cfg, _ = tiny_run
    layout = Layout.of(cfg)
    from fadrm.data.prepared import Prepared

    data = Prepared(layout.stage("prepare"))
    recipe = {**read_json(layout.stage("relabel") / RECIPE), "mode": "online"}
    good, broken = create_model("convnet", 10, 32).eval(), create_model("convnet", 10, 32)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    labels = SoftLabels(recipe, data, torch.device("cpu"), teachers=[("0-convnet", good), ("1-convnet", broken.eval())])
    labels.deferred = True
    images, views = torch.rand(20, 3, 32, 32), labels.views(0)
    labels.logits(0, images, views, np.arange(5), at="epoch 1, batch 1")
    labels.logits(0, images, views, np.arange(5, 10), at="epoch 1, batch 2")  # no error yet
    with pytest.raises(DivergenceError, match=r"teacher 1-convnet gave non-finite logits \(epoch 1, batch 1\)"):
        labels.check()
    labels.check()  # read once: nothing pending
