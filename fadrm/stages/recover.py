"""Stage 4 — recover: data residual matching (FADRM), or its SRe2L/RDED/random baselines.

For a batch of initial images P (teacher input space) and their labels y, with teachers
f_0..f_{M-1} and a schedule ((r_1, B_1), ..., (r_K, B_K)), T = sum B_k::

    x <- resize(P, r_1)
    for stage k:  fresh Adam(betas=(0.5, 0.9))
        for each global step t:  lr_t = lr0 (1 + cos(pi t / T)) / 2,  teacher m = t mod M
            x~ = jitter(flip(random_resized_crop(x, r_k)))
            L  = ce_weight CE(f_m(x~), y) + lambda_bn sum_l w_l (|mu_l - mu^_l|_2 + |var_l - var^_l|_2)
                 [+ topology_weight * TopologyLoss(features of f_m(x~), per class)   (off by default)]
            step; clamp x to the valid pixel range
        if k < K:  x <- a_k resize(x, r_{k+1}) + (1 - a_k) resize(P, r_{k+1})     (residual merge)

with a_k = alpha for every merge (FADRM), or the k-th entry of a schedule ``recover.alpha: [a_1, ...]``.

Batches are independent and seeded by their index, so finished batches are kept in
``<out>/.recover.partial`` and a rerun (after a crash or Ctrl-C) resumes from them.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fadrm import distributed
from fadrm.augment import recovery_view
from fadrm.config import Config, RecoverConfig
from fadrm.data.facts import default_jitter, default_recover_crop_scale, default_schedule
from fadrm.data.prepared import Prepared
from fadrm.device import autocast, grad_scaler, resolve_device, resolve_precision, to_device
from fadrm.distilled import ANCHORS, grid_by_class, load_set, save_set, to_uint8
from fadrm.efficiency import count_flops
from fadrm.errors import ConfigError, DivergenceError, MissingInputError
from fadrm.losses import BNStatsLoss, FeatureTap, TopologyLoss, grouped_bn_statistics
from fadrm.methods import METHODS, MethodSpec
from fadrm.models import create_model, has_batchnorm
from fadrm.numerics import SATURATED, SATURATED_RISE, FiniteWatch, StepGuard, gradients, saturated_share
from fadrm.progress import bar
from fadrm.shards import Shard
from fadrm.stage import Layout, require, stage_fingerprint, stage_run
from fadrm.teachers import load_teachers
from fadrm.tracker import NULL_TRACKER, Tracker
from fadrm.visualize import Axis, line_plot

Schedule = tuple[tuple[int, int], ...]


def preflight(cfg: Config, facts) -> None:
    """The schedule fits the dataset's resolution (when known), and every teacher has a loss."""
    spec = METHODS[cfg.method]
    if not spec.recover:
        return
    if facts is not None and facts.resolution is not None:
        resolve_schedule(cfg.recover, facts.resolution, spec)
    if cfg.recover.ce_weight == 0:
        teachers = cfg.squeeze.teachers if spec.all_teachers else cfg.squeeze.teachers[:1]
        resolution = facts.resolution if facts is not None and facts.resolution else 32
        for i, teacher in enumerate(teachers):
            if not has_batchnorm(create_model(teacher.arch, 2, resolution)):
                raise ConfigError(
                    f"teacher '{i}-{teacher.arch}' has no BatchNorm layers, and with recover.ce_weight=0 BN matching "
                    "is its only loss; set ce_weight > 0 or drop that teacher"
                )


def recover(cfg: Config, tracker: Tracker = NULL_TRACKER) -> dict:
    """Optimise the initial images (or pass them through, for rded/random) and publish them.

    Batches already finished by ``recover_shard`` (or an interrupted run) are reused; under
    ``torchrun`` every rank recovers its share of the batches and rank 0 publishes.
    """
    spec = METHODS[cfg.method]
    with stage_run("recover", cfg, tracker) as run:
        data = Prepared(run.input("prepare"))
        init, labels, init_manifest = load_set(run.input("select"))
        if spec.recover:
            plan = Recovery(cfg, run.layout, run.device, data, init, labels)
            stats = plan.run(Shard.of_process())
            distributed.barrier()  # under torchrun: every rank's batches are on disk from here on
            images, loss_rows = plan.assemble(run.tracker)
            resumed = plan.resumed_seconds()
            run.resumed_seconds += resumed  # batches finished before an interruption still count
            owned = sum(len(plan.batches[b]) for b in plan.owned)
            stats = {**plan.stats(), **stats, "s_per_image": round((plan.busy + resumed) / owned, 4) if owned else None}
            # each batch's own seconds, wherever and whenever it ran: a slow machine or a crowded one shows here
            stats["batch_seconds"] = [round(plan.batch_seconds[b], 3) for b in range(len(plan.batches))]
        else:
            images, loss_rows, stats = init, [], {"iterations": 0, "s_per_image": 0.0}
        entries = [
            {"label": e["label"], "class": e["class"], "init": e["file"], "patches": e["patches"]} for e in init_manifest["images"]
        ]
        header = {
            "method": cfg.method,
            "ipc": init_manifest["ipc"],
            "resolution": data.resolution,
            "classes": data.classes,
            "dataset_hash": data.digest,
        }
        save_set(run.dir, images, entries, header)
        grid_by_class(run.dir / "grid.png", data.classes, [("init", init, labels), ("synthetic", images, labels)])
        run.plots["recover_loss"] = loss_rows
        if loss_rows:
            line_plot(
                loss_rows,
                "step",
                Axis(("loss", "ce", "bn"), "loss, mean over batches (log scale)", log=True),
                run.dir / "loss.png",
                f"recover ({cfg.method})",
                xlabel="iteration (all resolution stages)",
            )
            run.artifacts.append("loss.png")
        run.artifacts += ["manifest.json", "grid.png"]
        run.metrics.update(images=len(entries), psnr_vs_init=psnr(images, init), **stats)
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(run.layout.partial("recover"), ignore_errors=True)
    return run.metrics


def recover_shard(cfg: Config, shard: Shard) -> dict:
    """Recover the batches of one shard into the partial folder, and publish nothing.

    Shards can run anywhere that sees the output folder (``fadrm recover --shard i/N`` by
    hand, Prefect tasks on Dask workers); ``recover`` then assembles what they made. A batch
    already on disk is skipped, so a shard that was cut off is simply run again.
    """
    if not METHODS[cfg.method].recover:
        return {"shard": str(shard), "batches": 0, "recovered": 0}
    layout = Layout.of(cfg)
    require(cfg, layout, "recover")
    data = Prepared(layout.stage("prepare"))
    init, labels, _ = load_set(layout.stage("select"))
    plan = Recovery(cfg, layout, resolve_device(cfg.device), data, init, labels)
    stats = plan.run(shard)
    plan.close()
    return {"shard": str(shard), "batches": len(shard.units(len(plan.batches))), **stats}


# ----------------------------------------------------------------------------- the method


def cosine_lr(step: int, total: int, lr0: float) -> float:
    """lr_t = lr0 (1 + cos(pi t / T)) / 2 — one schedule across all resolution stages."""
    return lr0 * (1 + math.cos(math.pi * step / max(total, 1))) / 2


def teacher_for_step(step: int, num_teachers: int) -> int:
    """Round-robin: one teacher per step, in order."""
    return step % num_teachers


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def residual_merge(x: torch.Tensor, init: torch.Tensor, alpha: float, size: int) -> torch.Tensor:
    """alpha * resize(x, size) + (1 - alpha) * resize(init, size): pull the optimised images back
    towards their real initialisation between stages (the data residual)."""
    return alpha * resize(x, size) + (1 - alpha) * resize(init, size)


def nearest_anchor(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """For each image of ``x`` (B x 3 x h x w), its candidate anchor (``anchors``: B x M x 3 x H x W)
    closest in mean squared pixel distance at the image's current resolution."""
    b, m = anchors.shape[:2]
    small = resize(anchors.flatten(0, 1), x.shape[-1]).view(b, m, *x.shape[1:])
    nearest = (small - x[:, None]).pow(2).flatten(2).mean(2).argmin(1)
    return anchors[torch.arange(b, device=anchors.device), nearest]


def rank_groups(losses: torch.Tensor, groups: int) -> torch.Tensor:
    """Each image's group by its loss rank among ``losses``: ``groups`` equal shares, easiest first."""
    ranks = torch.empty_like(losses, dtype=torch.long)
    ranks[torch.argsort(losses, stable=True)] = torch.arange(len(losses), device=losses.device)
    return ranks * groups // len(losses)


def resolve_schedule(rc: RecoverConfig, resolution: int, spec: MethodSpec) -> Schedule:
    schedule = tuple(tuple(p) for p in rc.schedule) if rc.schedule else default_schedule(resolution, rc.iterations)
    if schedule[-1][0] != resolution:
        raise ConfigError(
            f"recover.schedule ends at {schedule[-1][0]} px but the dataset is {resolution} px; the last stage must be at {resolution}"
        )
    if spec.single_resolution:
        schedule = ((resolution, sum(iters for _, iters in schedule)),)
    elif spec.merges:
        merge_alphas(rc.alpha, len(schedule))
    return schedule


def merge_alphas(alpha: float | tuple[float, ...], stages: int) -> tuple[float, ...]:
    """The weight of each of the ``stages - 1`` merges: one value for all, or a schedule of exactly that many."""
    if not isinstance(alpha, tuple):
        return (alpha,) * (stages - 1)
    if len(alpha) != stages - 1:
        raise ConfigError(
            f"recover.alpha lists {len(alpha)} merge weights but the schedule has {stages} stages, so {stages - 1} "
            "merges; give one value per merge, or a single value for all"
        )
    return alpha


@dataclass
class Teacher:
    name: str
    model: nn.Module
    bn: BNStatsLoss
    tap: FeatureTap | None = None  # its features, for the topology loss (recover.topology_weight > 0)
    topology: TopologyLoss | None = None


def recover_batch(
    x_init: torch.Tensor,
    targets: torch.Tensor,
    teachers: list[Teacher],
    schedule: Schedule,
    rc: RecoverConfig,
    *,
    merges: bool,
    bounds: tuple[torch.Tensor, torch.Tensor],
    jitter_limit: int,
    crop_scale: tuple[float, float],
    precision: str,
    rng: np.random.Generator,
    on_step=None,
    names: list[str] | None = None,
    anchors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[list[float]]]:
    """Recover one batch; returns the images (input space, final resolution) and a loss log.

    The log has one row ``[step, loss, ce, bn]`` every ``rc.log_every`` steps. ``anchors``
    (B x M x 3 x H x W, input space) are the real patches each image's merges may pull
    towards instead of its own initialisation (``recover.anchor: nearest``).
    """
    device = x_init.device
    total = sum(iters for _, iters in schedule)
    low, high = (b.to(device) for b in bounds)
    scaler = grad_scaler(device, precision)
    x = resize(x_init, schedule[0][0]).detach().clone().requires_grad_(True)
    topology = {}  # per teacher with a topology target: each class's rows in the batch and its target
    if rc.topology_weight > 0:
        host_labels = targets.cpu().numpy()
        topology = {t.name: t.topology.bind(host_labels) for t in teachers if t.topology is not None}
    log: list[list[float]] = []
    step = 0
    pinned_at_start = saturated_share(x_init, low, high)
    who = ", ".join((names or [])[:8])
    hint = f"lower recover.lr (now {rc.lr:g})"
    starts = np.cumsum([0] + [iters for _, iters in schedule])
    alphas = merge_alphas(rc.alpha, len(schedule)) if merges else ()

    def at(s: int) -> str:
        k = int(np.searchsorted(starts, s, side="right")) - 1
        teacher = teachers[teacher_for_step(s, len(teachers))]
        return f"iteration {s + 1}/{total} (stage {k + 1}, {schedule[k][0]} px, teacher {teacher.name})"

    # Without fp16 loss scaling nothing else syncs per step: the first non-finite step is kept on
    # the device and read where the loop syncs anyway (log rows, stage ends) -- see FiniteWatch.
    watch = None if scaler.is_enabled() else FiniteWatch(device)

    def check() -> None:
        bad = watch.first() if watch is not None else None
        if bad is None:
            return
        what, s, value = bad
        if what == "loss":
            raise DivergenceError(f"recover: loss became {value} at {at(s)} for images [{who}]; {hint}")
        raise DivergenceError(f"recover (images [{who}]): gradients became non-finite at {at(s)}; {hint}")

    for k, (res, iters) in enumerate(schedule):
        optimizer = torch.optim.Adam([x], lr=rc.lr, betas=(0.5, 0.9))
        guard = StepGuard(f"recover (images [{who}])", optimizer, scaler, hint)
        for _ in range(iters):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, rc.lr)
            teacher = teachers[teacher_for_step(step, len(teachers))]
            view = recovery_view(x, res, crop_scale, jitter_limit, rng)
            with autocast(device, precision):
                logits = teacher.model(view)
            ce = F.cross_entropy(logits.float(), targets)
            bn = teacher.bn.pop()
            loss = rc.ce_weight * ce + (rc.bn_weight * bn if bn is not None else 0.0)
            if teacher.name in topology:
                loss = loss + rc.topology_weight * TopologyLoss.loss(teacher.tap.pop(), topology[teacher.name])
            if watch is None:
                if not torch.isfinite(loss):
                    raise DivergenceError(f"recover: loss became {loss.item()} at {at(step)} for images [{who}]; {hint}")
            else:
                watch.loss(step, loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if watch is None:
                guard.step(at(step))
            else:
                watch.gradients(step, gradients(optimizer))
                optimizer.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, high), low))
            if step % rc.log_every == 0 or step == total - 1:
                check()
                terms = [loss, ce, bn if bn is not None else torch.zeros((), device=device)]
                log.append([step, *torch.stack([t.detach().float() for t in terms]).tolist()])
            step += 1
            if on_step is not None:
                on_step()
        check()
        pinned = saturated_share(x.detach(), low, high)  # collapse: the images became flat 0/255 fields
        if iters and pinned > SATURATED and pinned > pinned_at_start + SATURATED_RISE:
            raise DivergenceError(
                f"recover: {pinned:.0%} of the pixels are pinned at 0 or 255 after iteration {step}/{total} "
                f"(stage {k + 1}, {res} px; the initial images had {pinned_at_start:.0%}) for images [{who}]: "
                f"the step size is far too large; {hint}"
            )
        if k + 1 < len(schedule):
            nxt = schedule[k + 1][0]
            with torch.no_grad():
                anchor = x_init if anchors is None else nearest_anchor(x, anchors)
                merged = residual_merge(x, anchor, alphas[k], nxt) if merges else resize(x, nxt)
            x = merged.detach().clone().requires_grad_(True)
    return x.detach(), log


# ----------------------------------------------------------------------------- the stage body


class Recovery:
    """Everything one recovery needs, and its unit of work: a batch of images.

    Batches are fixed by the data (class-interleaved, ``recover.batch_size`` images each) and
    seeded by their index, so which process recovers which batch never changes the result.
    Finished batches are files in ``<out>/.recover.partial/<fingerprint>/``.
    """

    def __init__(self, cfg: Config, layout: Layout, device: torch.device, data: Prepared, init: torch.Tensor, labels: np.ndarray):
        self.cfg, self.rc, self.device, self.data = cfg, cfg.recover, device, data
        self.spec = METHODS[cfg.method]
        self.init, self.labels = init, labels
        self.schedule = resolve_schedule(self.rc, data.resolution, self.spec)
        loaded = load_teachers(layout.stage("squeeze"), data, device, which="all" if self.spec.all_teachers else "first")
        if self.rc.ce_weight == 0:
            for name, model in loaded:
                if not has_batchnorm(model):
                    raise ConfigError(
                        f"teacher '{name}' has no BatchNorm layers, and with recover.ce_weight=0 BN matching is its "
                        "only loss; set ce_weight > 0 or drop that teacher"
                    )
        self.teachers = [Teacher(name, model, BNStatsLoss(model, self.rc.first_bn_weight)) for name, model in loaded]
        self.thresholds: dict[str, torch.Tensor] = {}
        self.group_sizes: dict[str, torch.Tensor] = {}  # images per difficulty group, per teacher (assemble)
        self.precision = "fp32" if self.spec.fp32 else resolve_precision(self.rc.precision, device)
        self.bounds = (data.normalize(torch.zeros(1, 3, 1, 1)), data.normalize(torch.ones(1, 3, 1, 1)))
        self.jitter = self.rc.jitter if self.rc.jitter is not None else default_jitter(data.resolution)
        self.crop_scale = tuple(self.rc.crop_scale) if self.rc.crop_scale is not None else default_recover_crop_scale(data.resolution)
        order = _class_interleaved(labels)
        self.batches = [order[s : s + self.rc.batch_size] for s in range(0, len(order), self.rc.batch_size)]
        self.partial = layout.partial("recover") / stage_fingerprint("recover", cfg, layout)[:16]
        self.total_steps = sum(iters for _, iters in self.schedule)
        self.anchors = self._anchor_pool(layout) if self.rc.anchor == "nearest" and self.spec.merges else None
        if self.rc.bn_groups > 1:
            self._difficulty_groups()
        if self.rc.topology_weight > 0:
            self._topology_targets()

    # -- difficulty groups (PSM): BN statistics of real images as hard for the teacher as each image

    @torch.no_grad()
    def _losses(self, teacher: Teacher, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The teacher's cross-entropy per image (its BN hooks' terms are discarded)."""
        with autocast(self.device, self.precision):
            logits = teacher.model(x)
        teacher.bn.pop()
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def _difficulty_groups(self) -> None:
        """Per teacher: loss quantiles of a class-balanced sample of real training images, and each
        BN layer's statistics per quantile group; every image then matches its own group's."""
        train, groups = self.data.split("train"), self.rc.bn_groups
        rng = np.random.default_rng([self.cfg.seed, 0x95D])
        per_class = max(1, self.rc.bn_group_images // self.data.num_classes)
        picked = [rng.permutation(train.class_indices(c))[:per_class] for c in range(self.data.num_classes)]
        idx = np.sort(np.concatenate(picked))
        chunks = [idx[s : s + 500] for s in range(0, len(idx), 500)]

        def images(chunk: np.ndarray) -> torch.Tensor:
            return self.data.to_input(train.load(chunk, self.data.resolution), self.device)

        for teacher in self.teachers:
            losses = torch.cat([self._losses(teacher, images(c), to_device(train.labels[c], self.device)) for c in chunks])
            quantiles = torch.linspace(0, 1, groups + 1, device=losses.device)[1:-1]
            thresholds = torch.quantile(losses, quantiles)
            ids = torch.bucketize(losses, thresholds)
            spans = np.cumsum([0] + [len(c) for c in chunks])
            batches = ((images(c), ids[spans[i] : spans[i + 1]]) for i, c in enumerate(chunks))
            with autocast(self.device, self.precision):
                teacher.bn.use_groups(grouped_bn_statistics(teacher.model, batches, groups))
            teacher.bn.pop()
            self.thresholds[teacher.name] = thresholds

    # -- topology alignment (after RETA): each class's feature-space H0 persistence, as real images'

    def _topology_targets(self) -> None:
        """Per teacher, the features of ``recover.topology_images`` real training images per class,
        under the views recovery uses (final resolution), behind each class's topology target."""
        train, per_class, res = self.data.split("train"), self.rc.topology_images, self.data.resolution
        largest = max(int(np.bincount(self.labels[idx]).max()) for idx in self.batches)
        short = [self.data.classes[c] for c in range(self.data.num_classes) if len(train.class_indices(c)) < largest]
        if per_class < largest or short:
            where = f"classes {short[:5]} have fewer" if short else f"recover.topology_images={per_class} is fewer"
            raise ConfigError(
                f"recover.topology_weight > 0 compares up to {largest} images of a class with as many real ones, but "
                f"{where} than {largest} real training images; raise recover.topology_images or lower recover.batch_size"
            )
        rng = np.random.default_rng([self.cfg.seed, 0x7090])
        real: dict[str, dict[int, torch.Tensor]] = {t.name: {} for t in self.teachers}
        for teacher in self.teachers:
            teacher.tap = FeatureTap(teacher.model)
        for c in range(self.data.num_classes):
            idx = np.sort(rng.permutation(train.class_indices(c))[:per_class])
            views = recovery_view(self.data.to_input(train.load(idx, res), self.device), res, self.crop_scale, self.jitter, rng)
            for teacher in self.teachers:
                with torch.no_grad(), autocast(self.device, self.precision):
                    teacher.model(views)
                teacher.bn.pop()
                real[teacher.name][c] = teacher.tap.pop().float()
        for i, teacher in enumerate(self.teachers):
            teacher.topology = TopologyLoss(real[teacher.name], seed=(self.cfg.seed, i))

    def _groups_of(self, teacher: Teacher, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = self._losses(teacher, x, targets)
        if self.rc.bn_group_by == "loss":
            return torch.bucketize(losses, self.thresholds[teacher.name])
        return rank_groups(losses, self.rc.bn_groups)

    def _anchor_pool(self, layout: Layout) -> torch.Tensor:
        path = layout.stage("select") / ANCHORS
        if not path.is_file():
            raise ConfigError(
                "recover.anchor=nearest needs the real patches select keeps as anchors (select.anchor_pool > 0, "
                "select.factor 1); rerun `fadrm select` with them, or use recover.anchor=init"
            )
        return load_file(str(path))["pixels"]

    def batch_anchors(self, idx: np.ndarray) -> torch.Tensor | None:
        """Each image's candidate anchors: its own real patch, then its class's pool (input space)."""
        if self.anchors is None:
            return None
        own = self.init[idx][:, None]
        pool = self.anchors[torch.from_numpy(self.labels[idx])]
        both = torch.cat([own, pool], dim=1)
        return self.data.to_input(both.flatten(0, 1), self.device).view(*both.shape[:2], *both.shape[2:])

    def batch_file(self, b: int) -> Path:
        return self.partial / f"batch-{b:05d}.pt"

    def run(self, shard: Shard) -> dict:
        """Recover the shard's batches that are not on disk yet; time and count them."""
        self.partial.mkdir(parents=True, exist_ok=True)
        owned = shard.units(len(self.batches))
        progress = bar(
            len(owned) * self.total_steps,
            f"recover ({self.cfg.method}) shard {shard}" if shard.count > 1 else f"recover ({self.cfg.method})",
            unit="step",
        )
        self.owned, self.found, self.busy = owned, [], 0.0
        fresh = 0
        for b in owned:
            if self.batch_file(b).is_file():  # finished before an interruption, or by another shard
                self.found.append(b)
                progress.update(self.total_steps)
                continue
            start = time.perf_counter()
            self._recover_one(b, progress)
            self.busy += time.perf_counter() - start
            fresh += len(self.batches[b])
        progress.close()
        return {"s_per_image": round(self.busy / fresh, 4) if fresh else None, "recovered_images": fresh}

    def resumed_seconds(self) -> float:
        """The recorded time of the batches ``run`` found finished (read by ``assemble``)."""
        return sum(self.batch_seconds[b] for b in self.found)

    def _recover_one(self, b: int, progress) -> None:
        start = time.perf_counter()
        idx = self.batches[b]
        names = [f"{self.data.classes[self.labels[i]]}#{i}" for i in idx]
        x_init, targets = self.data.to_input(self.init[idx], self.device), to_device(self.labels[idx], self.device)
        groups = {}  # each image's group, per teacher: by its initialisation's loss (PSM)
        if self.thresholds:
            for teacher in self.teachers:
                groups[teacher.name] = self._groups_of(teacher, x_init, targets)
                teacher.bn.set_groups(groups[teacher.name])
        x, log = recover_batch(
            x_init,
            targets,
            self.teachers,
            self.schedule,
            self.rc,
            merges=self.spec.merges,
            bounds=self.bounds,
            jitter_limit=self.jitter,
            crop_scale=self.crop_scale,
            precision=self.precision,
            rng=np.random.default_rng([self.cfg.seed, b, 0x2EC0]),
            on_step=progress.update,
            names=names,
            anchors=self.batch_anchors(idx),
        )
        for teacher in self.teachers:
            teacher.bn.set_groups(None)
        saved = {
            "images": to_uint8(self.data.denormalize(x)),
            "log": torch.tensor(log, dtype=torch.float64),
            "seconds": time.perf_counter() - start,
            "groups": {name: ids.cpu() for name, ids in groups.items()},
        }
        tmp = self.batch_file(b).with_suffix(".tmp")
        torch.save(saved, tmp)
        tmp.replace(self.batch_file(b))

    def assemble(self, tracker: Tracker) -> tuple[torch.Tensor, list[dict]]:
        """The whole recovered set from the batch files, and the mean loss curve."""
        missing = [b for b in range(len(self.batches)) if not self.batch_file(b).is_file()]
        if missing:
            raise MissingInputError(f"recover: batches {missing[:10]} are not recovered yet (run the missing shards)")
        out = torch.empty_like(self.init)
        logs = []
        self.batch_seconds = {}
        self.group_sizes = {}
        for b, idx in enumerate(self.batches):
            saved = torch.load(self.batch_file(b), weights_only=True)
            out[idx] = saved["images"]
            logs.append(saved["log"])
            self.batch_seconds[b] = float(saved.get("seconds", 0.0))
            for name, ids in saved.get("groups", {}).items():
                sizes = torch.bincount(ids, minlength=self.rc.bn_groups)
                self.group_sizes[name] = self.group_sizes.get(name, 0) + sizes
        self.close()
        mean_log = torch.stack(logs).mean(0).tolist()  # the loss curve: mean over batches at every logged step
        rows = [{"step": int(step), "loss": loss, "ce": ce, "bn": bn} for step, loss, ce, bn in mean_log]
        for row in rows[:: max(1, len(rows) // 100)]:  # at most ~100 points to the tracker
            tracker.log_metrics({"recover_loss": row["loss"], "recover_ce": row["ce"], "recover_bn": row["bn"]}, step=row["step"])
        return out, rows

    def stats(self) -> dict:
        flops = _flops_per_step(self.teachers, self.schedule, self.rc.batch_size, self.data, self.device, self.precision)
        return {
            "iterations": self.total_steps,
            "schedule": [list(p) for p in self.schedule],
            "precision": self.precision,
            "teachers": [t.name for t in self.teachers],
            "batches": len(self.batches),
            "flops": flops * len(self.batches),
            **self._group_stats(),
        }

    def _group_stats(self) -> dict:
        """How many of the images fell in each difficulty group, per teacher (PSM; read by ``assemble``)."""
        if not self.group_sizes:
            return {}
        sizes = {name: counts.tolist() for name, counts in self.group_sizes.items()}
        return {"bn_groups": self.rc.bn_groups, "images_per_bn_group": sizes}

    def close(self) -> None:
        for teacher in self.teachers:
            teacher.bn.remove()
            if teacher.tap is not None:
                teacher.tap.remove()


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float | None:
    """PSNR (dB) of uint8 ``images`` against ``reference``: how far recovery moved the set away from
    its real initialisation (None when nothing moved). The residual merges keep it high."""
    mse = (images.float() - reference.float()).pow(2).mean().item()
    return None if mse == 0 else round(10 * math.log10(255**2 / mse), 3)


def _class_interleaved(labels: np.ndarray) -> np.ndarray:
    """Order images so each batch mixes classes: image 0 of every class, then image 1, ..."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        rank[where] = np.arange(len(where))
    return np.lexsort((labels, rank))


def _flops_per_step(teachers: list[Teacher], schedule: Schedule, batch: int, data: Prepared, device, precision) -> int:
    """FLOPs of all steps of one batch (forward + backward to the pixels), counted once per shape."""
    total = 0
    step = 0
    for res, iters in schedule:
        per_teacher = []
        for teacher in teachers:
            x = torch.zeros(batch, 3, res, res, device=device, requires_grad=True)

            def one_step(model=teacher.model, x=x):
                with autocast(device, precision):
                    model(x).float().sum().backward()

            per_teacher.append(count_flops(one_step))
            teacher.bn.pop()
        total += sum(per_teacher[teacher_for_step(s, len(teachers))] for s in range(step, step + iters))
        step += iters
    return total
