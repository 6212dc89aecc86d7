"""Stage 5 — relabel: FKD-style soft labels for recorded views of the synthetic images.

Per epoch, every image gets a random-resized crop + flip, and views of the same batch are
CutMix-ed; the teachers' averaged logits for exactly that view are the label. ``stored``
mode writes the views (integer crop boxes, flips, CutMix partner and box) and fp16 logits
to ``labels.safetensors``; ``online`` mode writes only the recipe, and evaluation computes
the same views from the same seed and asks the teachers then. Either way
:class:`SoftLabels` gives evaluation the views and logits for any epoch.
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fadrm.augment import Views, render_views, sample_views
from fadrm.config import Config
from fadrm.data.prepared import Prepared
from fadrm.device import autocast, resolve_precision
from fadrm.distilled import load_set
from fadrm.efficiency import flops_per_sample
from fadrm.errors import DamagedInputError, DivergenceError, MissingInputError
from fadrm.io import read_json, write_json
from fadrm.progress import bar
from fadrm.stage import stage_run
from fadrm.stages.squeeze import load_teachers
from fadrm.tracker import NULL_TRACKER, Tracker

LABELS = "labels.safetensors"
RECIPE = "labels.json"
VIEW_FIELDS = {"index": torch.int32, "box": torch.int16, "flip": torch.uint8, "partner": torch.int32, "mix": torch.int16}


def relabel(cfg: Config, tracker: Tracker = NULL_TRACKER) -> dict:
    """Write the soft labels (stored) or their recipe (online). Returns the stage metrics."""
    rl = cfg.relabel
    with stage_run("relabel", cfg, tracker) as run:
        data = Prepared(run.input("prepare"))
        images, _, _ = load_set(run.input("recover"))
        teachers = load_teachers(run.input("squeeze"), data, run.device)
        n = len(images)
        recipe = {
            "mode": rl.mode, "epochs": rl.epochs, "num_images": n, "size": data.resolution, "seed": cfg.seed,
            "batch_size": rl.batch_size, "crop_scale": list(rl.crop_scale), "cutmix": rl.cutmix,
            "teachers": [name for name, _ in teachers], "num_classes": data.num_classes,
        }
        if rl.mode == "stored":
            labels = SoftLabels(recipe, data, run.device, teachers=teachers, precision=rl.precision)
            x01 = images.to(run.device).float().div_(255)
            arrays = {f: torch.empty((rl.epochs, n, *((4,) if f in ("box", "mix") else ())), dtype=d)
                      for f, d in VIEW_FIELDS.items()}
            logits = torch.empty(rl.epochs, n, data.num_classes, dtype=torch.float16)
            progress = bar(rl.epochs, "relabel", unit="epoch")
            for epoch in range(rl.epochs):
                views = labels.views(epoch)
                for field, dtype in VIEW_FIELDS.items():
                    arrays[field][epoch] = torch.from_numpy(getattr(views, field).astype(np.int64)).to(dtype)
                for start in range(0, n, rl.batch_size):
                    pos = np.arange(start, min(start + rl.batch_size, n))
                    at = f"epoch {epoch + 1}, views {start}-{pos[-1]}"
                    logits[epoch, pos] = _fp16_labels(labels.teacher_logits(x01, views, pos, at=at), at)
                progress.update()
            progress.close()
            save_file({**arrays, "logits": logits}, str(run.dir / LABELS))
            size = (run.dir / LABELS).stat().st_size
            run.metrics.update(bytes_total=size, bytes_per_image_epoch=round(size / (n * rl.epochs), 2))
            run.metrics["flops"] = sum(flops_per_sample(m, data.resolution, run.device) for _, m in teachers) * n * rl.epochs
        else:
            run.metrics.update(bytes_total=0, bytes_per_image_epoch=0.0)
        write_json(run.dir / RECIPE, recipe)
        run.artifacts.append(RECIPE)
        run.metrics.update(mode=rl.mode, epochs=rl.epochs, views=n * rl.epochs)
    return run.metrics


class SoftLabels:
    """Views and teacher logits for any epoch, from stored labels or computed online."""

    def __init__(self, recipe: dict, data: Prepared, device: torch.device, teachers=None, stored=None,
                 precision: str = "auto"):
        self.recipe, self.data, self.device = recipe, data, device
        self.teachers = teachers
        self.stored = stored
        self.precision = resolve_precision(precision, device)

    @classmethod
    def open(cls, folder, data: Prepared, device: torch.device, squeeze_dir, precision: str = "auto") -> SoftLabels:
        if not (folder / RECIPE).is_file():
            raise MissingInputError(f"no soft labels in {folder}; run `fadrm relabel` first")
        recipe = read_json(folder / RECIPE)
        if recipe["mode"] == "stored":
            stored = load_file(str(folder / LABELS))
            if not torch.isfinite(stored["logits"]).all():
                raise DamagedInputError(
                    f"the soft labels in {folder / LABELS} hold non-finite values (made by broken teachers); "
                    "rerun `fadrm squeeze` and `fadrm relabel`, or `fadrm run`"
                )
            return cls(recipe, data, device, stored=stored, precision=precision)
        return cls(recipe, data, device, teachers=load_teachers(squeeze_dir, data, device), precision=precision)

    @property
    def epochs(self) -> int:
        return self.recipe["epochs"]

    def views(self, epoch: int) -> Views:
        """Epoch ``epoch``'s views (evaluation past the recorded epochs cycles through them)."""
        epoch %= self.epochs
        if self.stored is not None:
            return Views(*(self.stored[f][epoch].numpy().astype(np.int64) for f in VIEW_FIELDS))
        r = self.recipe
        return sample_views(r["num_images"], r["size"], r["size"], r["seed"], epoch, r["batch_size"],
                            tuple(r["crop_scale"]), r["cutmix"])

    def render(self, x01: torch.Tensor, views: Views, positions: np.ndarray) -> torch.Tensor:
        """The normalised views at ``positions`` of the images ``x01`` ([0, 1])."""
        return self.data.normalize(render_views(x01, views, positions, self.recipe["size"]))

    @torch.no_grad()
    def teacher_logits(self, x01: torch.Tensor, views: Views, positions: np.ndarray, at: str = "") -> torch.Tensor:
        """The teachers' averaged logits for these views, computed now (non-finite ones are refused:
        they come from broken teachers, and whatever learns from them would be blamed instead)."""
        x = self.render(x01, views, positions)
        total = None
        for name, model in self.teachers:
            with autocast(self.device, self.precision):
                out = model(x).float()
            if not torch.isfinite(out).all():
                raise DivergenceError(
                    f"soft labels: teacher {name} gave non-finite logits ({at or 'these views'}); the teacher in "
                    "squeeze/ is broken: rerun `fadrm squeeze` (a lower squeeze.lr) and `fadrm relabel`"
                )
            total = out if total is None else total + out
        return total / len(self.teachers)

    def logits(self, epoch: int, x01: torch.Tensor, views: Views, positions: np.ndarray, at: str = "") -> torch.Tensor:
        if self.stored is not None:
            return self.stored["logits"][epoch % self.epochs][torch.from_numpy(positions)].float().to(self.device)
        return self.teacher_logits(x01, views, positions, at=at)


def _fp16_labels(logits: torch.Tensor, at: str) -> torch.Tensor:
    """Logits as stored (fp16), refusing values that do not fit (|x| > 65504 becomes inf)."""
    half = logits.half().cpu()
    if not torch.isfinite(half).all():
        raise DivergenceError(
            f"relabel: teacher logits up to {logits.abs().max().item():.3g} at {at} do not fit fp16 storage; "
            "such teachers are broken (rerun `fadrm squeeze` with a lower squeeze.lr), or use relabel.mode=online"
        )
    return half
