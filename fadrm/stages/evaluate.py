"""Stage 6 — evaluate: train a student from scratch on the distilled set, test on real data.

The student sees the relabel stage's views (the same ones, drawn from the recipe) and learns
the teachers' soft labels with KL at temperature tau; AdamW (no decay on 1-D parameters),
cosine schedule per optimiser step, micro-batches with gradient accumulation. The real test
split gives top-1/top-5 every ``eval_every`` epochs and after the last: final and best are
reported, with the per-epoch curve in ``plots/evaluate_accuracy.json``.

Under ``torchrun`` the student trains data-parallel: every micro-batch of views is split
across the ranks, each rank's loss is weighted by its share, and DistributedDataParallel
averages the gradients, so one step is the same mean over the same views as in one process
(on GPUs BatchNorm statistics are synchronised too; on CPUs, with Gloo, each rank normalises
its part of the batch). Rank 0 tests and publishes.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fadrm import distributed
from fadrm.config import Config
from fadrm.data.prepared import Prepared
from fadrm.device import autocast, grad_scaler, resolve_precision, to_device
from fadrm.distilled import load_set
from fadrm.efficiency import flops_per_sample
from fadrm.engine import accumulation_weights, accuracy, param_groups, seed_everything, warmup_cosine
from fadrm.losses import soft_kl
from fadrm.models import create_model
from fadrm.numerics import StepGuard, check_epoch_loss, check_model
from fadrm.progress import bar
from fadrm.stage import stage_run, summarize
from fadrm.stages.relabel import SoftLabels
from fadrm.tracker import NULL_TRACKER, Tracker
from fadrm.visualize import Axis, line_plot
from fadrm.weights import save_weights


def evaluate(cfg: Config, tracker: Tracker = NULL_TRACKER) -> dict:
    """Train and test the student; also writes the run summary. Returns the stage metrics."""
    ev = cfg.evaluate
    with stage_run("evaluate", cfg, tracker) as run:
        device = run.device
        data = Prepared(run.input("prepare"))
        images, labels, _ = load_set(run.input("recover"))
        soft = SoftLabels.open(run.input("relabel"), data, device, run.input("squeeze"), ev.precision)
        seed_everything(cfg.seed)
        x_u8 = images.to(device)  # uint8 on the device: a quarter of the float copy
        targets = torch.from_numpy(labels).to(device)
        student = create_model(ev.student, data.num_classes, data.resolution).to(device)
        trained = _data_parallel(student, device)
        precision = resolve_precision(ev.precision, device)
        optimizer = torch.optim.AdamW(param_groups(student, ev.weight_decay), lr=ev.lr)
        n = len(images)
        sizes = [min(ev.batch_size, n - start) for start in range(0, n, ev.batch_size)]
        micro = len(sizes)
        weights = accumulation_weights(sizes, ev.accumulate)  # each step: the mean over the samples it saw
        steps_per_epoch = math.ceil(micro / ev.accumulate)
        total = ev.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, 0, ev.final_lr_fraction))
        scaler = grad_scaler(device, precision)
        rank, world = distributed.rank(), distributed.world_size()
        where, hint = f"evaluate ({ev.student})", f"lower evaluate.lr (now {ev.lr:g})"
        guard = StepGuard(where, optimizer, scaler, hint)
        curve: list[dict] = []
        best = (0.0, 0.0)
        progress = bar(ev.epochs, f"evaluate ({ev.student})", unit="epoch")
        for epoch in range(ev.epochs):
            trained.train()
            views = soft.views(epoch)
            loss_sum = torch.zeros((), device=device)  # summed on the device: one host sync per epoch
            for m, start in enumerate(range(0, n, ev.batch_size)):
                pos = np.arange(start, min(start + ev.batch_size, n))
                closes_group = (m + 1) % ev.accumulate == 0 or m + 1 == micro
                local, share = rank_part(pos, rank, world)
                sync = contextlib.nullcontext() if closes_group or world == 1 else trained.no_sync()
                at = f"epoch {epoch + 1}, micro-batch {m + 1}/{micro}"
                with sync:
                    if len(local):
                        x = soft.render(x_u8, views, local)
                        with autocast(device, precision):
                            out = trained(x)
                        if ev.labels == "soft":
                            loss = soft_kl(out, soft.logits(epoch, x_u8, views, local, at=at), ev.temperature)
                        else:
                            loss = _mixed_ce(out.float(), targets, views, local, data.resolution)
                        loss_sum += loss.detach() * len(local)
                    else:  # fewer views than ranks: take part in the gradient average with nothing
                        loss = sum(p.sum() for p in trained.parameters()) * 0.0
                    # this rank's share of the micro-batch's mean, that micro-batch's share of its step
                    scaler.scale(loss * share * weights[m]).backward()
                if closes_group:
                    if scaler.is_enabled():
                        guard.step(at)  # fp16: an overflow the scaler cannot absorb is divergence
                    else:  # no per-step host sync: a non-finite value shows in the epoch's checks below
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
            if world > 1:
                dist.all_reduce(loss_sum)
            train_loss = loss_sum.item() / n
            soft.check()  # online labels on CUDA: the teachers' finiteness, read once per epoch
            check_model(student, where, f"the end of epoch {epoch + 1}", hint)
            check_epoch_loss(train_loss, data.num_classes, where, f"epoch {epoch + 1}", hint, final=epoch + 1 == ev.epochs)
            row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0]}
            if ((epoch + 1) % ev.eval_every == 0 or epoch + 1 == ev.epochs) and distributed.is_main():
                top1, top5 = accuracy(student, data.test_batches(ev.test_batch_size, device, cfg.data.workers), precision)
                row.update(top1=top1, top5=top5)
                best = max(best, (top1, top5))
                progress.set_postfix(top1=f"{top1:.3f}", refresh=False)
            curve.append(row)
            if (epoch + 1) % cfg.tracking.log_every == 0 or "top1" in row:
                run.tracker.log_metrics({f"student_{k}": v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            progress.update()
        progress.close()
        run.metrics.update(
            world_size=world, student=ev.student, epochs=ev.epochs, labels=ev.labels, label_mode=soft.recipe["mode"], images=n
        )
        if distributed.is_main():
            _report(run, cfg, student, data, soft, curve, best)
    if distributed.is_main():
        summarize(run.layout)
    return run.metrics


def rank_part(pos: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, float]:
    """This rank's contiguous part of a micro-batch, and the weight of its mean loss.

    DistributedDataParallel averages the ranks' gradients; weighting each rank's mean loss by
    ``len(part) * world / len(pos)`` makes that average the gradient of the mean over the whole
    micro-batch, also when the parts differ in size (the last micro-batch of an epoch)."""
    local = np.array_split(pos, world)[rank]
    return local, len(local) * world / len(pos)


def _data_parallel(student: nn.Module, device: torch.device) -> nn.Module:
    """The student as trained: itself alone, or wrapped for DistributedDataParallel under torchrun."""
    if distributed.world_size() == 1:
        return student
    distributed.init(device)
    if device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        return nn.parallel.DistributedDataParallel(student, device_ids=[device.index])
    return nn.parallel.DistributedDataParallel(student)


def _report(run, cfg: Config, student: nn.Module, data: Prepared, soft: SoftLabels, curve: list[dict], best) -> None:
    ev = cfg.evaluate
    save_weights(
        student,
        run.dir / "student.safetensors",
        {
            "arch": ev.student,
            "num_classes": data.num_classes,
            "resolution": data.resolution,
            "dataset_hash": data.digest,
            "top1": round(curve[-1]["top1"], 4),
            "config": cfg.sections(("evaluate",)),
        },
    )
    tested = [{k: r[k] for k in ("epoch", "top1", "top5")} for r in curve if "top1" in r]
    run.plots["evaluate_accuracy"] = tested
    run.plots["evaluate_loss"] = [{k: r[k] for k in ("epoch", "train_loss", "lr")} for r in curve]
    line_plot(
        tested,
        "epoch",
        Axis(("top1", "top5"), "test accuracy (%)", percent=True),
        run.dir / "accuracy.png",
        f"student {ev.student} on the real test split",
        xlabel="epoch",
    )
    loss_name = "KL divergence to the soft labels" if ev.labels == "soft" else "cross-entropy"
    line_plot(
        curve,
        "epoch",
        Axis(("train_loss",), f"training loss ({loss_name})"),
        run.dir / "loss.png",
        f"student {ev.student} on the distilled set",
        xlabel="epoch",
    )
    run.artifacts += ["accuracy.png", "loss.png", "student.json"]
    n = run.metrics["images"]
    device = run.device
    flops = flops_per_sample(student, data.resolution, device, train=True) * ev.epochs * n
    flops += flops_per_sample(student, data.resolution, device) * len(tested) * len(data.split("test"))
    if soft.teachers is not None:  # online labels: the teachers run during training
        flops += sum(flops_per_sample(m, data.resolution, device) for _, m in soft.teachers) * ev.epochs * n
    run.metrics.update(flops=flops, top1=curve[-1]["top1"], top5=curve[-1]["top5"], best_top1=best[0], best_top5=best[1])


def _mixed_ce(logits: torch.Tensor, targets: torch.Tensor, views, pos: np.ndarray, size: int) -> torch.Tensor:
    """Hard-label loss for CutMix-ed views: CE to both labels, weighted by pasted area."""
    own = targets[to_device(views.index[pos], targets.device)]
    other = targets[to_device(views.index[views.partner[pos]], targets.device)]
    frac = to_device(views.mix_fraction(pos, size), logits.device).to(torch.float32)
    per = (1 - frac) * F.cross_entropy(logits, own, reduction="none") + frac * F.cross_entropy(logits, other, reduction="none")
    return per.mean()
