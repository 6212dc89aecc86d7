"""Stage 6 — evaluate: train a student from scratch on the distilled set, test on real data.

The student sees the relabel stage's views (replayed, or recomputed online) and learns the
teachers' soft labels with KL at temperature tau; AdamW (no decay on 1-D parameters),
cosine schedule per optimiser step, micro-batches with gradient accumulation. The real test
split gives top-1/top-5 every ``eval_every`` epochs and after the last: final and best are
reported, with the per-epoch curve in ``plots/evaluate_accuracy.json``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fadrm.config import Config
from fadrm.data.prepared import Prepared
from fadrm.device import autocast, grad_scaler, resolve_precision
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
from fadrm.visualize import line_plot
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
        x01 = images.to(device).float().div_(255)
        targets = torch.from_numpy(labels).to(device)
        student = create_model(ev.student, data.num_classes, data.resolution).to(device)
        precision = resolve_precision(ev.precision, device)
        optimizer = torch.optim.AdamW(param_groups(student, ev.weight_decay), lr=ev.lr)
        sizes = [min(ev.batch_size, len(images) - start) for start in range(0, len(images), ev.batch_size)]
        micro = len(sizes)
        weights = accumulation_weights(sizes, ev.accumulate)  # the last group weighs by its real size
        steps_per_epoch = math.ceil(micro / ev.accumulate)
        total = ev.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, total, 0, ev.final_lr_fraction)
        )
        scaler = grad_scaler(device, precision)
        where, hint = f"evaluate ({ev.student})", f"lower evaluate.lr (now {ev.lr:g})"
        guard = StepGuard(where, optimizer, scaler, hint)
        curve: list[dict] = []
        best = (0.0, 0.0)
        progress = bar(ev.epochs, f"evaluate ({ev.student})", unit="epoch")
        for epoch in range(ev.epochs):
            student.train()
            views = soft.views(epoch)
            running = 0.0
            for m, start in enumerate(range(0, len(images), ev.batch_size)):
                pos = np.arange(start, min(start + ev.batch_size, len(images)))
                x = soft.render(x01, views, pos)
                with autocast(device, precision):
                    out = student(x)
                at = f"epoch {epoch + 1}, micro-batch {m + 1}/{micro}"
                if ev.labels == "soft":
                    loss = soft_kl(out, soft.logits(epoch, x01, views, pos, at=at), ev.temperature)
                else:
                    loss = _mixed_ce(out.float(), targets, views, pos, data.resolution)
                guard.check_loss(loss, at)
                scaler.scale(loss * weights[m]).backward()
                running += loss.item() * len(pos)
                if (m + 1) % ev.accumulate == 0 or m + 1 == micro:
                    guard.step(at)
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
            check_model(student, where, f"the end of epoch {epoch + 1}", hint)
            check_epoch_loss(running / len(images), data.num_classes, where, f"epoch {epoch + 1}", hint,
                             final=epoch + 1 == ev.epochs)
            row = {"epoch": epoch + 1, "train_loss": running / len(images), "lr": scheduler.get_last_lr()[0]}
            if (epoch + 1) % ev.eval_every == 0 or epoch + 1 == ev.epochs:
                top1, top5 = accuracy(student, data.test_batches(ev.test_batch_size, device, cfg.data.workers), precision)
                row.update(top1=top1, top5=top5)
                best = max(best, (top1, top5))
                progress.set_postfix(top1=f"{top1:.3f}", refresh=False)
            curve.append(row)
            if (epoch + 1) % cfg.tracking.log_every == 0 or "top1" in row:
                run.tracker.log_metrics({f"student_{k}": v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            progress.update()
        progress.close()
        save_weights(student, run.dir / "student.safetensors", {
            "arch": ev.student, "num_classes": data.num_classes, "resolution": data.resolution,
            "dataset_hash": data.digest, "top1": round(curve[-1]["top1"], 4), "config": cfg.sections(("evaluate",)),
        })
        tested = [{k: r[k] for k in ("epoch", "top1", "top5")} for r in curve if "top1" in r]
        run.plots["evaluate_accuracy"] = tested
        run.plots["evaluate_loss"] = [{k: r[k] for k in ("epoch", "train_loss", "lr")} for r in curve]
        line_plot(tested, "epoch", ["top1", "top5"], run.dir / "accuracy.png", f"student {ev.student}: test accuracy")
        line_plot(curve, "epoch", ["train_loss"], run.dir / "loss.png", f"student {ev.student}: training loss")
        run.artifacts += ["accuracy.png", "loss.png", "student.json"]
        tests = sum(1 for r in curve if "top1" in r)
        flops = flops_per_sample(student, data.resolution, device, train=True) * ev.epochs * len(images)
        flops += flops_per_sample(student, data.resolution, device) * tests * len(data.split("test"))
        if soft.teachers is not None:  # online labels: the teachers run during training
            flops += sum(flops_per_sample(m, data.resolution, device) for _, m in soft.teachers) * ev.epochs * len(images)
        run.metrics.update(
            flops=flops,
            top1=curve[-1]["top1"], top5=curve[-1]["top5"], best_top1=best[0], best_top5=best[1],
            student=ev.student, epochs=ev.epochs, labels=ev.labels, label_mode=soft.recipe["mode"],
            images=len(images),
        )
    summarize(run.layout)
    return run.metrics


def _mixed_ce(logits: torch.Tensor, targets: torch.Tensor, views, pos: np.ndarray, size: int) -> torch.Tensor:
    """Hard-label loss for CutMix-ed views: CE to both labels, weighted by pasted area."""
    own = targets[torch.from_numpy(views.index[pos]).to(targets.device)]
    other = targets[torch.from_numpy(views.index[views.partner[pos]]).to(targets.device)]
    frac = torch.from_numpy(views.mix_fraction(pos, size)).to(logits.device, torch.float32)
    per = (1 - frac) * F.cross_entropy(logits, own, reduction="none") + frac * F.cross_entropy(logits, other, reduction="none")
    return per.mean()
