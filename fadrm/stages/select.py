"""Stage 3 — select: the initial images, IPC per class.

``patches`` (FADRM, RDED): per class draw ``candidates`` real images, take
``crops_per_image`` random-resized square crops of side ``resolution / factor`` from each,
score every crop by the first teacher's cross-entropy to the true class (the crop
zero-padded, centred, to the full input size), keep each image's best crop, keep the best
``IPC * factor^2`` and stitch ``factor x factor`` of them per image (cell k of image i takes
rank ``k * IPC + i``). ``random``: IPC random real images. ``noise``: Gaussian noise in the
teacher's input space (SRe2L). The manifest names, for every patch, its real source file,
crop box and score.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fadrm.augment import crop_boxes, resized_crop
from fadrm.config import Config
from fadrm.data.facts import default_factor
from fadrm.data.prepared import Prepared, Split
from fadrm.device import autocast, resolve_precision
from fadrm.distilled import grid_by_class, save_set, to_uint8
from fadrm.efficiency import flops_per_sample
from fadrm.errors import ConfigError, DataError
from fadrm.methods import METHODS
from fadrm.progress import bar
from fadrm.stage import StageRun, stage_run
from fadrm.stages.squeeze import load_teachers
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
    """Write IPC initial images per class with their lineage. Returns the stage metrics."""
    spec = METHODS[cfg.method]
    with stage_run("select", cfg, tracker) as run:
        data = Prepared(run.input("prepare"))
        train = data.split("train")
        _check_ipc(cfg.ipc, data, train)
        rng = np.random.default_rng([cfg.seed, 0x5E1EC7])
        init = {"patches": _patches, "random": _random_images, "noise": _noise}[spec.init]
        images, entries, extra = init(cfg, data, train, run, rng)
        header = {"method": cfg.method, "init": spec.init, "ipc": cfg.ipc, "resolution": data.resolution,
                  "classes": data.classes, "dataset_hash": data.digest, **extra}
        save_set(run.dir, images, entries, header)
        labels = np.asarray([e["label"] for e in entries])
        grid_by_class(run.dir / "grid.png", data.classes, [("init", images, labels)])
        run.artifacts += ["manifest.json", "grid.png"]
        run.metrics.update(images=len(entries), init=spec.init, **{k: v for k, v in extra.items() if k == "factor"})
    return run.metrics


def _check_ipc(ipc: int, data: Prepared, train: Split) -> None:
    for label, name in enumerate(data.classes):
        have = len(train.class_indices(label))
        if have < ipc:
            raise DataError(f"ipc={ipc} but class '{name}' has only {have} training images; lower ipc")


def _patches(cfg: Config, data: Prepared, train: Split, run: StageRun, rng: np.random.Generator):
    sel = cfg.select
    res = data.resolution
    factor = sel.factor or default_factor(res)
    if res % factor:
        raise ConfigError(f"select.factor={factor} does not divide the resolution {res}")
    patch, need = res // factor, cfg.ipc * factor * factor
    (name, teacher), = load_teachers(run.input("squeeze"), data, run.device, which="first")
    precision = resolve_precision("auto", run.device)
    images, entries = [], []
    progress = bar(data.num_classes, "select", unit="class")
    for label, class_name in enumerate(data.classes):
        pool = train.class_indices(label)
        count = min(sel.candidates, len(pool))
        if count < need:
            raise ConfigError(
                f"class '{class_name}': {count} candidate images cannot give ipc x factor^2 = {need} patches; "
                "raise select.candidates or lower ipc"
            )
        chosen = np.sort(rng.choice(pool, size=count, replace=False))
        best = _best_crop_per_image(teacher, data, train, chosen, label, patch, sel, rng, run.device, precision)
        ranked = sorted(best, key=lambda b: b["score"])[:need]
        for i in range(cfg.ipc):
            cells = [ranked[k * cfg.ipc + i] for k in range(factor * factor)]
            canvas = torch.zeros(3, res, res, dtype=torch.uint8)
            for k, cell in enumerate(cells):
                row, col = divmod(k, factor)
                canvas[:, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = cell.pop("pixels")
                cell["cell"] = k
            images.append(canvas)
            entries.append({"label": label, "class": class_name, "patches": cells})
        progress.update()
    progress.close()
    scored = sum(min(sel.candidates, len(train.class_indices(c))) for c in range(data.num_classes)) * sel.crops_per_image
    run.metrics["flops"] = flops_per_sample(teacher, res, run.device) * scored
    return torch.stack(images), entries, {"factor": factor, "teacher": name, "patch_size": patch}


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
        src = train.load(idx, res).to(device).float().div_(255).repeat_interleave(per, dim=0)
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
        best.append({"source": train.sources[source_index], "box": [top, left, h, w],
                     "score": round(float(scores[j]), 5), "pixels": pixels[j]})
    return best


def _random_images(cfg: Config, data: Prepared, train: Split, run: StageRun, rng: np.random.Generator):
    images, entries = [], []
    for label, class_name in enumerate(data.classes):
        chosen = np.sort(rng.choice(train.class_indices(label), size=cfg.ipc, replace=False))
        images.append(train.load(chosen, data.resolution))
        res = data.resolution
        entries += [{"label": label, "class": class_name,
                     "patches": [{"source": train.sources[i], "box": [0, 0, res, res], "score": None, "cell": 0}]}
                    for i in chosen]
    return torch.cat(images), entries, {}


def _noise(cfg: Config, data: Prepared, train: Split, run: StageRun, rng: np.random.Generator):
    n, res = cfg.ipc * data.num_classes, data.resolution
    gaussian = torch.from_numpy(rng.standard_normal((n, 3, res, res), dtype=np.float32))
    images = to_uint8(data.denormalize(gaussian))
    labels = np.repeat(np.arange(data.num_classes), cfg.ipc)
    entries = [{"label": int(y), "class": data.classes[y], "patches": []} for y in labels]
    return images, entries, {}
