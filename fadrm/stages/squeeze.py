"""Stage 2 — squeeze: obtain the teacher(s) and measure them on the real test split.

Each entry of ``squeeze.teachers`` is trained (SGD with Nesterov momentum, linear warmup +
cosine, label smoothing, crop + flip), loaded from a user's weights file, or fetched from
timm (network). Output (``<out>/squeeze``): ``<i>-<arch>.safetensors`` with a JSON card
(architecture, dataset hash, accuracy, sha256, config) and ``teachers.json`` listing them.
Training checkpoints every epoch, with the loss history and the seconds spent so far, so an
interrupted run resumes where it stopped and still reports the whole training (curve,
seconds, FLOPs). Training that diverges stops at the epoch where it does (:mod:`fadrm.numerics`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from fadrm.config import Config, TeacherConfig, fingerprint
from fadrm.data.prepared import Prepared
from fadrm.device import autocast, grad_scaler, resolve_precision
from fadrm.efficiency import flops_per_sample
from fadrm.engine import accuracy, param_groups, seed_everything, to_channels_last, warmup_cosine
from fadrm.errors import DivergenceError, WeightsError
from fadrm.io import read_json, write_json
from fadrm.models import create_model
from fadrm.numerics import FiniteWatch, StepGuard, check_epoch_loss, check_model, gradients
from fadrm.progress import bar
from fadrm.stage import StageRun, stage_run
from fadrm.teachers import TEACHERS
from fadrm.tracker import NULL_TRACKER, Tracker
from fadrm.visualize import Axis, line_plot
from fadrm.weights import load_weights, save_weights

LOSS_EVERY = 20  # steps between reads of the running loss (a host sync on GPUs)


def _weight_files(cfg: Config) -> dict[str, Path]:
    return {
        f"squeeze.teachers.{i}.weights": Path(t.weights)
        for i, t in enumerate(cfg.squeeze.teachers)
        if t.weights not in (None, "pretrained")
    }


def input_files(cfg: Config) -> dict[str, Path]:
    """The teachers' weights files (for lineage: a file changed in place makes squeeze stale)."""
    return _weight_files(cfg)


def preflight(cfg: Config, facts) -> None:
    """Every weights file named in the config exists."""
    for key, path in _weight_files(cfg).items():
        if not path.is_file():
            raise WeightsError(f"{key}: weights file not found: {path}")


def squeeze(cfg: Config, tracker: Tracker = NULL_TRACKER) -> dict:
    """Train/load every teacher, test it, save it. Returns the stage metrics."""
    preflight(cfg, None)
    with stage_run("squeeze", cfg, tracker) as run:
        data = Prepared(run.input("prepare"))
        cards = []
        flops = 0
        for index, spec in enumerate(cfg.squeeze.teachers):
            name = f"{index}-{spec.arch}"
            model, epochs_run = obtain_teacher(spec, name, data, run)
            trained = epochs_run * len(data.split("train"))  # all epochs, those before a resume included
            flops += flops_per_sample(model, data.resolution, run.device, train=True) * trained
            flops += flops_per_sample(model, data.resolution, run.device) * len(data.split("test"))
            precision = resolve_precision(cfg.squeeze.precision, run.device)
            top1, top5 = accuracy(model, data.test_batches(256, run.device, cfg.data.workers), precision, who=f"squeeze {name}")
            card = save_weights(
                model,
                run.dir / f"{name}.safetensors",
                {
                    "name": name,
                    "arch": spec.arch,
                    "origin": "trained" if spec.weights is None else spec.weights,
                    "num_classes": data.num_classes,
                    "resolution": data.resolution,
                    "dataset": data.manifest["name"],
                    "dataset_hash": data.digest,
                    "top1": round(top1, 4),
                    "top5": round(top5, 4),
                    "config": cfg.sections(("seed", "squeeze")),
                },
            )
            cards.append(card)
            tracker.log_metrics({f"teacher_top1.{name}": top1, f"teacher_top5.{name}": top5})
            run.artifacts += [card["file"], Path(card["file"]).with_suffix(".json").name]
        write_json(run.dir / TEACHERS, cards)
        if run.plots.get("squeeze_loss"):
            line_plot(
                run.plots["squeeze_loss"],
                "epoch",
                Axis(("train_loss",), "training loss (cross-entropy)"),
                run.dir / "loss.png",
                "teacher training",
                xlabel="epoch",
                group="teacher",
                right=Axis(("test_top1",), "test top-1 accuracy (%)", percent=True),
            )
            run.artifacts.append("loss.png")
        run.artifacts.append(TEACHERS)
        run.metrics.update(
            teacher_top1=cards[0]["top1"],
            teacher_top5=cards[0]["top5"],
            teachers={c["name"]: c["top1"] for c in cards},
            teacher_sha256={c["name"]: c["sha256"] for c in cards},
            flops=flops,
        )
    shutil.rmtree(run.layout.partial("squeeze"), ignore_errors=True)  # the checkpoints served their purpose
    return run.metrics


def obtain_teacher(spec: TeacherConfig, name: str, data: Prepared, run: StageRun) -> tuple[nn.Module, int]:
    """The teacher in eval mode, and how many epochs it was trained (0 for given weights)."""
    seed_everything(run.cfg.seed)  # before building: the initial weights come from the global RNG
    pretrained = spec.weights == "pretrained"
    model = create_model(spec.arch, data.num_classes, data.resolution, pretrained=pretrained)
    if spec.weights is not None and not pretrained:
        load_weights(model, Path(spec.weights))
    model = model.to(run.device)
    epochs_run = train_teacher(model, name, data, run) if spec.weights is None else 0
    return model.eval(), epochs_run


def train_teacher(model: nn.Module, name: str, data: Prepared, run: StageRun) -> int:
    """Supervised training on the train split, with per-epoch checkpoints for resuming.

    Returns the number of epochs trained. After a resume, the epochs before the interruption
    come back from the checkpoint with their loss rows (plotted and logged again) and their
    seconds (``run.resumed_seconds``)."""
    cfg, sq = run.cfg, run.cfg.squeeze
    precision = resolve_precision(sq.precision, run.device)
    model = to_channels_last(model, sq.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, sq.weight_decay), lr=sq.lr, momentum=sq.momentum, nesterov=sq.nesterov)
    steps_per_epoch = math.ceil(len(data.split("train")) / sq.batch_size)
    total, warmup = sq.epochs * steps_per_epoch, round(sq.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    scaler = grad_scaler(run.device, precision)
    generator = torch.Generator().manual_seed(cfg.seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=sq.label_smoothing)
    checkpoint = run.layout.partial("squeeze") / f"{name}.ckpt"
    data_fp = read_json(run.layout.stage("prepare") / "stage.json")["fingerprint"]
    start, history, seconds = _resume(checkpoint, data_fp, cfg, model, optimizer, scheduler, scaler, generator)
    for row in history:
        run.tracker.log_metrics({f"{k}.{name}": v for k, v in row.items() if k not in ("teacher", "epoch")}, step=row["epoch"])
    run.plots.setdefault("squeeze_loss", []).extend(history)
    run.resumed_seconds += seconds
    where, hint = f"squeeze {name}", f"lower squeeze.lr (now {sq.lr:g}) or raise squeeze.warmup_epochs"
    guard = StepGuard(where, optimizer, scaler, hint)
    progress = bar(total, f"squeeze {name}", unit="step", initial=start * steps_per_epoch)
    for epoch in range(start, sq.epochs):
        began = time.perf_counter()
        model.train()
        # the loss is summed on the device and read every LOSS_EVERY steps; without fp16 loss
        # scaling, a non-finite step is kept on the device too (FiniteWatch) -- no per-step sync
        running, seen = torch.zeros((), device=run.device), 0
        watch = None if scaler.is_enabled() else FiniteWatch(run.device)
        for step, (x, y) in enumerate(data.train_batches(sq.batch_size, generator, run.device, sq.crop_padding, cfg.data.workers)):
            if sq.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(run.device, precision):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            if watch is None:
                at = f"epoch {epoch + 1}, step {step + 1}/{steps_per_epoch}"
                guard.check_loss(loss, at)
                scaler.scale(loss).backward()
                guard.step(at)
            else:
                watch.loss(step, loss)
                loss.backward()
                watch.gradients(step, gradients(optimizer))
                optimizer.step()
            scheduler.step()
            running += loss.detach().float() * len(y)
            seen += len(y)
            progress.update()
            if (step + 1) % LOSS_EVERY == 0:
                _check_watch(watch, where, hint, epoch, steps_per_epoch)
                progress.set_postfix(epoch=epoch + 1, loss=f"{float(running) / seen:.3f}", refresh=False)
        _check_watch(watch, where, hint, epoch, steps_per_epoch)
        running = float(running)
        check_model(model, where, f"the end of epoch {epoch + 1}", hint)
        check_epoch_loss(running / seen, data.num_classes, where, f"epoch {epoch + 1}", hint, final=epoch + 1 == sq.epochs)
        row = {"train_loss": running / seen, "lr": scheduler.get_last_lr()[0]}
        if sq.eval_every and (epoch + 1) % sq.eval_every == 0:
            row["test_top1"], _ = accuracy(model, data.test_batches(256, run.device, cfg.data.workers), precision)
        run.tracker.log_metrics({f"{k}.{name}": v for k, v in row.items()}, step=epoch + 1)
        run.plots["squeeze_loss"].append({"teacher": name, "epoch": epoch + 1, **row})
        seconds += time.perf_counter() - began
        mine = [r for r in run.plots["squeeze_loss"] if r["teacher"] == name]
        _save_checkpoint(
            checkpoint, data_fp, cfg, epoch + 1, model, optimizer, scheduler, scaler, generator, history=mine, seconds=seconds
        )
    progress.close()
    return sq.epochs  # the checkpoint stays until the stage is published: a later teacher may still fail


def _check_watch(watch: FiniteWatch | None, where: str, hint: str, epoch: int, steps_per_epoch: int) -> None:
    bad = watch.first() if watch is not None else None
    if bad is not None:
        what, step, value = bad
        at = f"epoch {epoch + 1}, step {step + 1}/{steps_per_epoch}"
        problem = f"loss became {value}" if what == "loss" else "gradients became non-finite"
        raise DivergenceError(f"{where}: {problem} at {at}; {hint}")


def _ckpt_key(data_fingerprint: str, cfg: Config) -> str:
    return fingerprint({"data": data_fingerprint, "params": cfg.sections(("seed", "squeeze"))})


def _save_checkpoint(
    path, data_fp, cfg, epoch, model, optimizer, scheduler, scaler, generator, *, history: list[dict], seconds: float
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "history": json.dumps(history),
        "seconds": seconds,
        "key": _ckpt_key(data_fp, cfg),
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _resume(path, data_fp, cfg, model, optimizer, scheduler, scaler, generator) -> tuple[int, list[dict], float]:
    """Restore a checkpoint made with the same data and params: the epoch to start at, the loss rows
    of the epochs before it and the seconds they took (0, [], 0.0 when there is nothing to resume)."""
    if not path.is_file():
        return 0, [], 0.0
    state = torch.load(path, map_location="cpu", weights_only=True)  # our own file, still no pickle
    if state.get("key") != _ckpt_key(data_fp, cfg):
        return 0, [], 0.0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]), json.loads(state.get("history", "[]")), float(state.get("seconds", 0.0))
