"""Stage 2 — squeeze: obtain the teacher(s) and measure them on the real test split.

Each entry of ``squeeze.teachers`` is trained (SGD with Nesterov momentum, linear warmup +
cosine, label smoothing, crop + flip), loaded from a user's weights file, or fetched from
timm (network). Output (``<out>/squeeze``): ``<i>-<arch>.safetensors`` with a JSON card
(architecture, dataset hash, accuracy, sha256, config) and ``teachers.json`` listing them.
Training checkpoints every epoch; an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from fadrm.config import Config, TeacherConfig, fingerprint
from fadrm.data.prepared import Prepared
from fadrm.device import autocast, grad_scaler, resolve_precision
from fadrm.efficiency import flops_per_sample
from fadrm.engine import accuracy, param_groups, seed_everything, to_channels_last, warmup_cosine
from fadrm.errors import DivergenceError
from fadrm.io import read_json, write_json
from fadrm.models import create_model
from fadrm.progress import bar
from fadrm.stage import StageRun, stage_run
from fadrm.teachers import TEACHERS
from fadrm.tracker import NULL_TRACKER, Tracker
from fadrm.visualize import Axis, line_plot
from fadrm.weights import load_weights, save_weights


def squeeze(cfg: Config, tracker: Tracker = NULL_TRACKER) -> dict:
    """Train/load every teacher, test it, save it. Returns the stage metrics."""
    with stage_run("squeeze", cfg, tracker) as run:
        data = Prepared(run.input("prepare"))
        cards = []
        flops = 0
        for index, spec in enumerate(cfg.squeeze.teachers):
            name = f"{index}-{spec.arch}"
            model, epochs_run = obtain_teacher(spec, name, data, run)
            trained = epochs_run * len(data.split("train"))  # a resumed run trains only the rest
            flops += flops_per_sample(model, data.resolution, run.device, train=True) * trained
            flops += flops_per_sample(model, data.resolution, run.device) * len(data.split("test"))
            precision = resolve_precision(cfg.squeeze.precision, run.device)
            top1, top5 = accuracy(model, data.test_batches(256, run.device, cfg.data.workers), precision)
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
            line_plot(run.plots["squeeze_loss"], "epoch", Axis(("train_loss",), "training loss (cross-entropy)"),
                      run.dir / "loss.png", "teacher training", xlabel="epoch", group="teacher",
                      right=Axis(("test_top1",), "test top-1 accuracy (%)", percent=True))
            run.artifacts.append("loss.png")
        run.artifacts.append(TEACHERS)
        run.metrics.update(
            teacher_top1=cards[0]["top1"],
            teacher_top5=cards[0]["top5"],
            teachers={c["name"]: c["top1"] for c in cards},
            teacher_sha256={c["name"]: c["sha256"] for c in cards},
            flops=flops,
        )
    return run.metrics


def obtain_teacher(spec: TeacherConfig, name: str, data: Prepared, run: StageRun) -> tuple[nn.Module, int]:
    """The teacher in eval mode, and how many epochs were trained in this call."""
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
    Returns the number of epochs trained now (fewer than configured after a resume)."""
    cfg, sq = run.cfg, run.cfg.squeeze
    precision = resolve_precision(sq.precision, run.device)
    model = to_channels_last(model, sq.channels_last)
    optimizer = torch.optim.SGD(
        param_groups(model, sq.weight_decay), lr=sq.lr, momentum=sq.momentum, nesterov=sq.nesterov
    )
    steps_per_epoch = math.ceil(len(data.split("train")) / sq.batch_size)
    total, warmup = sq.epochs * steps_per_epoch, round(sq.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    scaler = grad_scaler(run.device, precision)
    generator = torch.Generator().manual_seed(cfg.seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=sq.label_smoothing)
    checkpoint = run.layout.partial("squeeze") / f"{name}.ckpt"
    data_fp = read_json(run.layout.stage("prepare") / "stage.json")["fingerprint"]
    start = _resume(checkpoint, data_fp, cfg, model, optimizer, scheduler, scaler, generator)
    progress = bar(total, f"squeeze {name}", unit="step", initial=start * steps_per_epoch)
    for epoch in range(start, sq.epochs):
        model.train()
        running, seen = 0.0, 0
        for x, y in data.train_batches(sq.batch_size, generator, run.device, sq.crop_padding, cfg.data.workers):
            if sq.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(run.device, precision):
                loss = criterion(model(x), y)
            if not torch.isfinite(loss):
                raise DivergenceError(f"squeeze {name}: loss became {loss.item()} in epoch {epoch + 1}; lower squeeze.lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            running += loss.item() * len(y)
            seen += len(y)
            progress.update()
            progress.set_postfix(epoch=epoch + 1, loss=f"{running / seen:.3f}", refresh=False)
        row = {"train_loss": running / seen, "lr": scheduler.get_last_lr()[0]}
        if sq.eval_every and (epoch + 1) % sq.eval_every == 0:
            row["test_top1"], _ = accuracy(model, data.test_batches(256, run.device, cfg.data.workers), precision)
        run.tracker.log_metrics({f"{k}.{name}": v for k, v in row.items()}, step=epoch + 1)
        run.plots.setdefault("squeeze_loss", []).append({"teacher": name, "epoch": epoch + 1, **row})
        _save_checkpoint(checkpoint, data_fp, cfg, epoch + 1, model, optimizer, scheduler, scaler, generator)
    progress.close()
    checkpoint.unlink(missing_ok=True)
    return sq.epochs - start


def _ckpt_key(data_fingerprint: str, cfg: Config) -> str:
    return fingerprint({"data": data_fingerprint, "params": cfg.sections(("seed", "squeeze"))})


def _save_checkpoint(path, data_fp, cfg, epoch, model, optimizer, scheduler, scaler, generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
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


def _resume(path, data_fp, cfg, model, optimizer, scheduler, scaler, generator) -> int:
    """Restore a checkpoint made with the same data and params; return the epoch to start at."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)  # our own file, still no pickle
    if state.get("key") != _ckpt_key(data_fp, cfg):
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"])

