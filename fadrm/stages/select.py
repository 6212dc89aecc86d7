"""Stage 3 — select: the initial images, IPC per class.

``patches`` (FADRM, RDED): per class draw ``candidates`` real images, take
``crops_per_image`` random-resized square crops of side ``resolution / factor`` from each,
score every crop by the first teacher's cross-entropy to the true class (the crop
zero-padded, centred, to the full input size), keep each image's best crop, keep
``IPC * factor^2`` of them -- the best (``select.pick: top``, RDED's) or ranks evenly spaced from
easiest to hardest (``spread``; ``auto``: spread for the methods that recover) -- and stitch
``factor x factor`` of them per image (cell k of image i takes the k * IPC + i-th kept).
``random``: IPC random real images. ``noise``: Gaussian noise in the teacher's input space
(SRe2L). The manifest names, for every patch, its real source file, crop box and score.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fadrm import distributed
from fadrm.augment import crop_boxes, resized_crop
from fadrm.config import Config
from fadrm.data.facts import default_factor
from fadrm.data.prepared import Prepared, Split
from fadrm.device import autocast, resolve_device, resolve_precision, to_device
from fadrm.distilled import ANCHORS, grid_by_class, save_set, to_uint8
from fadrm.efficiency import flops_per_sample
from fadrm.errors import ConfigError, DataError, MissingInputError
from fadrm.methods import METHODS
from fadrm.progress import bar
from fadrm.shards import Shard
from fadrm.stage import Layout, require, stage_fingerprint, stage_run
from fadrm.teachers import load_teachers
from fadrm.tracker import NULL_TRACKER, Tracker

SQUARE = (1.0, 1.0)


def preflight(cfg: Config, facts) -> None:
    """IPC, stitching factor and candidates fit the classes (once the prepared dataset is known)."""
    if facts is None or facts.train_counts is None:
        return
    spec = METHODS[cfg.method]
    for name, have in facts.train_counts.items():
        if have < cfg.ipc:
            raise DataError(f"ipc={cfg.ipc} but class '{name}' has only {have} training images; lower ipc")
    if spec.init != "patches":
        return
    factor = cfg.select.factor or default_factor(facts.resolution)
    if facts.resolution % factor:
        raise ConfigError(f"select.factor={factor} does not divide the resolution {facts.resolution}")
    need = cfg.ipc * factor * factor
    for name, have in facts.train_counts.items():
        count = min(cfg.select.candidates, have)
        if count < need:
            raise ConfigError(
                f"class '{name}': {count} candidate images cannot give ipc x factor^2 = {need} patches; "
                "raise select.candidates or lower ipc"
            )


def select(cfg: Config, tracker: Tracker = NULL_TRACKER) -> dict:
    """Write IPC initial images per class with their lineage. Returns the stage metrics.

    Classes are the units of work: each is drawn from its own seed, so classes finished by
    ``select_shard`` (or an interrupted run) are reused and any split gives the same images.
    """
    spec = METHODS[cfg.method]
    with stage_run("select", cfg, tracker) as run:
        plan = Selection(cfg, run.layout, run.device)
        fresh = plan.run(Shard.of_process())
        distributed.barrier()
        images, entries, extra = plan.assemble()
        data = plan.data
        header = {
            "method": cfg.method,
            "init": spec.init,
            "ipc": cfg.ipc,
            "resolution": data.resolution,
            "classes": data.classes,
            "dataset_hash": data.digest,
            **extra,
        }
        save_set(run.dir, images, entries, header)
        if plan.anchors and min(len(a) for a in plan.anchors.values()) > 0:
            size = min(len(a) for a in plan.anchors.values())
            save_file({"pixels": torch.stack([plan.anchors[c][:size] for c in range(data.num_classes)])}, str(run.dir / ANCHORS))
        labels = np.asarray([e["label"] for e in entries])
        grid_by_class(run.dir / "grid.png", data.classes, [("init", images, labels)])
        run.artifacts += ["manifest.json", "grid.png"]
        run.metrics.update(images=len(entries), init=spec.init, **{k: v for k, v in extra.items() if k == "factor"})
        run.metrics["selected_classes"] = fresh  # by this process; the others by shards or an interrupted run
        if plan.flops:
            run.metrics["flops"] = plan.flops
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(run.layout.partial("select"), ignore_errors=True)
    return run.metrics


def select_shard(cfg: Config, shard: Shard) -> dict:
    """Select the classes of one shard into the partial folder, and publish nothing."""
    layout = Layout.of(cfg)
    require(cfg, layout, "select")
    plan = Selection(cfg, layout, resolve_device(cfg.device))
    done = plan.run(shard)
    return {"shard": str(shard), "classes": len(shard.units(plan.data.num_classes)), "selected": done}


class Selection:
    """One class's initial images at a time, each class from its own random stream."""

    def __init__(self, cfg: Config, layout: Layout, device: torch.device):
        self.cfg, self.device = cfg, device
        self.spec = METHODS[cfg.method]
        self.data = Prepared(layout.stage("prepare"))
        self.train = self.data.split("train")
        _check_ipc(cfg.ipc, self.data, self.train)
        self.squeeze_dir = layout.stage("squeeze")
        self.partial = layout.partial("select") / stage_fingerprint("select", cfg, layout)[:16]
        self.factor = cfg.select.factor or default_factor(self.data.resolution)
        if self.spec.init == "patches" and self.data.resolution % self.factor:
            raise ConfigError(f"select.factor={self.factor} does not divide the resolution {self.data.resolution}")
        self._teacher = None
        self.flops = 0
        self.anchors: dict[int, torch.Tensor] = {}  # class -> uint8 real patches kept as residual anchors

    def class_file(self, label: int) -> Path:
        return self.partial / f"class-{label:05d}.pt"

    def run(self, shard: Shard) -> int:
        """Select the shard's classes that are not on disk yet; how many were selected now."""
        self.partial.mkdir(parents=True, exist_ok=True)
        owned = shard.units(self.data.num_classes)
        progress = bar(len(owned), "select" if shard.count == 1 else f"select shard {shard}", unit="class")
        fresh = 0
        for label in owned:
            if not self.class_file(label).is_file():
                rng = np.random.default_rng([self.cfg.seed, 0x5E1EC7, label])
                init = {"patches": self._patches, "random": self._random_images, "noise": self._noise}[self.spec.init]
                images, entries = init(label, rng)
                tmp = self.class_file(label).with_suffix(".tmp")
                saved = {"images": images, "entries": json.dumps(entries)}
                if label in self.anchors:
                    saved["anchors"] = self.anchors[label]
                torch.save(saved, tmp)
                tmp.replace(self.class_file(label))
                fresh += 1
            progress.update()
        progress.close()
        return fresh

    def assemble(self) -> tuple[torch.Tensor, list[dict], dict]:
        missing = [c for c in range(self.data.num_classes) if not self.class_file(c).is_file()]
        if missing:
            raise MissingInputError(f"select: classes {missing[:10]} are not selected yet (run the missing shards)")
        images, entries = [], []
        for label in range(self.data.num_classes):
            saved = torch.load(self.class_file(label), weights_only=True)
            images.append(saved["images"])
            entries += json.loads(saved["entries"])
            if "anchors" in saved:
                self.anchors[label] = saved["anchors"]
        extra = {}
        if self.spec.init == "patches":
            res = self.data.resolution
            extra = {"factor": self.factor, "teacher": self.teacher[0], "patch_size": res // self.factor}
            scored = (
                sum(min(self.cfg.select.candidates, len(self.train.class_indices(c))) for c in range(self.data.num_classes))
                * self.cfg.select.crops_per_image
            )
            self.flops = flops_per_sample(self.teacher[1], res, self.device) * scored
        return torch.cat(images), entries, extra

    @property
    def teacher(self):
        if self._teacher is None:
            (self._teacher,) = load_teachers(self.squeeze_dir, self.data, self.device, which="first")
        return self._teacher

    def _patches(self, label: int, rng: np.random.Generator):
        sel, data, cfg = self.cfg.select, self.data, self.cfg
        res, factor = data.resolution, self.factor
        patch, need = res // factor, cfg.ipc * factor * factor
        class_name = data.classes[label]
        pool = self.train.class_indices(label)
        count = min(sel.candidates, len(pool))
        if count < need:
            raise ConfigError(
                f"class '{class_name}': {count} candidate images cannot give ipc x factor^2 = {need} patches; "
                "raise select.candidates or lower ipc"
            )
        chosen = np.sort(rng.choice(pool, size=count, replace=False))
        precision = resolve_precision("auto", self.device)
        best = _best_crop_per_image(self.teacher[1], data, self.train, chosen, label, patch, sel, rng, self.device, precision)
        ranked = sorted(best, key=lambda b: b["score"])
        picked = spread(len(ranked), need) if pick_of(cfg) == "spread" else list(range(need))
        taken = set(picked)
        rest = [b for i, b in enumerate(ranked) if i not in taken]
        pool = [b.pop("pixels") for b in rest[: sel.anchor_pool]] if factor == 1 else []
        ranked = [ranked[i] for i in picked]
        images, entries = [], []
        for i in range(cfg.ipc):
            cells = [ranked[k * cfg.ipc + i] for k in range(factor * factor)]
            canvas = torch.zeros(3, res, res, dtype=torch.uint8)
            for k, cell in enumerate(cells):
                row, col = divmod(k, factor)
                canvas[:, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = cell.pop("pixels")
                cell["cell"] = k
            images.append(canvas)
            entries.append({"label": label, "class": class_name, "patches": cells})
        self.anchors[label] = torch.stack(pool) if pool else torch.empty(0, 3, res, res, dtype=torch.uint8)
        return torch.stack(images), entries

    def _random_images(self, label: int, rng: np.random.Generator):
        res = self.data.resolution
        chosen = np.sort(rng.choice(self.train.class_indices(label), size=self.cfg.ipc, replace=False))
        entries = [
            {
                "label": label,
                "class": self.data.classes[label],
                "patches": [{"source": self.train.sources[i], "box": [0, 0, res, res], "score": None, "cell": 0}],
            }
            for i in chosen
        ]
        return self.train.load(chosen, res), entries

    def _noise(self, label: int, rng: np.random.Generator):
        res = self.data.resolution
        gaussian = torch.from_numpy(rng.standard_normal((self.cfg.ipc, 3, res, res), dtype=np.float32))
        entries = [{"label": label, "class": self.data.classes[label], "patches": []} for _ in range(self.cfg.ipc)]
        return to_uint8(self.data.denormalize(gaussian)), entries


def pick_of(cfg: Config) -> str:
    """``select.pick``, with ``auto`` resolved: spread for the methods that recover, top for RDED."""
    if cfg.select.pick != "auto":
        return cfg.select.pick
    return "spread" if METHODS[cfg.method].recover else "top"


def spread(count: int, need: int) -> list[int]:
    """``need`` ranks evenly spaced over ``count`` (first and last included), in rank order."""
    if need == 1:
        return [0]
    return [round(i * (count - 1) / (need - 1)) for i in range(need)]


def _check_ipc(ipc: int, data: Prepared, train: Split) -> None:
    for label, name in enumerate(data.classes):
        have = len(train.class_indices(label))
        if have < ipc:
            raise DataError(f"ipc={ipc} but class '{name}' has only {have} training images; lower ipc")


@torch.no_grad()
def _best_crop_per_image(teacher, data, train, chosen, label, patch, sel, rng, device, precision) -> list[dict]:
    """Score ``crops_per_image`` crops of every chosen image; keep each image's lowest-CE crop."""
    res = data.resolution
    per = sel.crops_per_image
    boxes = crop_boxes(len(chosen) * per, res, tuple(sel.crop_scale), rng, ratio=SQUARE)
    scores = np.empty(len(chosen) * per)
    pixels = torch.empty(len(chosen) * per, 3, patch, patch, dtype=torch.uint8)
    images_per_chunk = max(1, sel.batch_size // per)
    pad = (res - patch) // 2
    for start in range(0, len(chosen), images_per_chunk):
        idx = chosen[start : start + images_per_chunk]
        src = to_device(train.load(idx, res), device).float().div_(255).repeat_interleave(per, dim=0)
        span = slice(start * per, (start + len(idx)) * per)
        crops = resized_crop(src, torch.from_numpy(boxes[span]), patch)
        x = F.pad(data.normalize(crops), (pad, res - patch - pad, pad, res - patch - pad))  # 0 = the mean colour
        with autocast(device, precision):
            logits = teacher(x)
        target = torch.full((len(x),), label, device=device)
        scores[span] = F.cross_entropy(logits.float(), target, reduction="none").cpu().numpy()
        pixels[span] = to_uint8(crops)
    best = []
    for i, source_index in enumerate(chosen):
        j = i * per + int(np.argmin(scores[i * per : (i + 1) * per]))
        top, left, h, w = (int(v) for v in boxes[j])
        best.append(
            {"source": train.sources[source_index], "box": [top, left, h, w], "score": round(float(scores[j]), 5), "pixels": pixels[j]}
        )
    return best
