"""Stage 5 — relabel: FKD-style soft labels for augmented views of the synthetic images.

Per epoch, every image gets a random-resized crop + flip, and views of the same batch are
CutMix-ed; the teachers' averaged logits for exactly that view are the label. The views are
a pure function of the recipe (seed, epoch, sizes; ``fadrm.augment.sample_views``), so they
are never stored: evaluation draws the same ones again. ``stored`` mode writes the logits to
``labels.safetensors`` (fp16, or the ``relabel.top_k`` largest with a fill value for the
rest), ``online`` mode writes only the recipe and the teachers label the views during
evaluation. Either way :class:`SoftLabels` gives evaluation the views and logits of any epoch,
reading one slice of the file at a time.

Epochs are the units of work: finished epochs are kept in ``<out>/.relabel.partial`` (a
rerun resumes), and under ``torchrun`` each rank labels its share (``fadrm.shards``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fadrm import distributed
from fadrm.augment import Views, render_views, sample_views
from fadrm.config import Config, RelabelConfig
from fadrm.data.facts import default_relabel_crop_scale
from fadrm.data.prepared import Prepared
from fadrm.device import autocast, resolve_precision, to_device
from fadrm.distilled import load_set
from fadrm.efficiency import flops_per_sample
from fadrm.errors import DamagedInputError, DivergenceError, MissingInputError
from fadrm.io import read_json, write_json
from fadrm.progress import bar
from fadrm.shards import Shard
from fadrm.stage import stage_fingerprint, stage_run
from fadrm.teachers import load_teachers
from fadrm.tracker import NULL_TRACKER, Tracker

LABELS = "labels.safetensors"
RECIPE = "labels.json"


def relabel(cfg: Config, tracker: Tracker = NULL_TRACKER) -> dict:
    """Write the soft labels (stored) or their recipe (online). Returns the stage metrics."""
    rl = cfg.relabel
    with stage_run("relabel", cfg, tracker) as run:
        data = Prepared(run.input("prepare"))
        images, _, _ = load_set(run.input("recover"))
        teachers = load_teachers(run.input("squeeze"), data, run.device)
        recipe = make_recipe(rl, len(images), data, cfg.seed, [name for name, _ in teachers])
        run.metrics.update(mode=rl.mode, epochs=rl.epochs, views=len(images) * rl.epochs, world_size=distributed.world_size())
        if rl.mode == "stored":
            partial = run.layout.partial("relabel") / stage_fingerprint("relabel", cfg, run.layout)[:16]
            labels = SoftLabels(recipe, data, run.device, teachers=teachers, precision=rl.precision)
            _label_epochs(labels, images.to(run.device), partial, Shard.of_process())
            distributed.barrier()  # under torchrun: every rank's epochs are on disk from here on
            save_file(_assemble(partial, rl.epochs), str(run.dir / LABELS))
            size = (run.dir / LABELS).stat().st_size
            run.metrics.update(
                bytes_total=size, bytes_per_image_epoch=round(size / (len(images) * rl.epochs), 2), storage=recipe["storage"]
            )
            flops = sum(flops_per_sample(m, data.resolution, run.device) for _, m in teachers)
            run.metrics["flops"] = flops * len(images) * rl.epochs
        else:
            run.metrics.update(bytes_total=0, bytes_per_image_epoch=0.0, storage="none")
        write_json(run.dir / RECIPE, recipe)
        run.artifacts.append(RECIPE)
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(run.layout.partial("relabel"), ignore_errors=True)
    return run.metrics


def make_recipe(rl: RelabelConfig, num_images: int, data: Prepared, seed: int, teachers: list[str]) -> dict:
    """Everything that decides the views and how their labels are kept."""
    top_k = rl.top_k if rl.top_k is not None and rl.top_k < data.num_classes else None
    return {
        "mode": rl.mode,
        "epochs": rl.epochs,
        "num_images": num_images,
        "size": data.resolution,
        "seed": seed,
        "batch_size": rl.batch_size,
        "cutmix": rl.cutmix,
        "crop_scale": list(rl.crop_scale or default_relabel_crop_scale(data.resolution)),
        "teachers": teachers,
        "num_classes": data.num_classes,
        "top_k": top_k,
        "storage": "fp16" if top_k is None else f"top{top_k}-fp16",
    }


def _label_epochs(labels: SoftLabels, images: torch.Tensor, partial: Path, shard: Shard) -> None:
    """Label the shard's epochs that are not on disk yet, one file per epoch."""
    partial.mkdir(parents=True, exist_ok=True)
    recipe = labels.recipe
    owned = [e for e in shard.units(recipe["epochs"]) if not (partial / f"epoch-{e:05d}.safetensors").is_file()]
    progress = bar(len(owned), "relabel", unit="epoch")
    n, batch = recipe["num_images"], recipe["batch_size"]
    for epoch in owned:
        views = labels.views(epoch)
        rows = []
        for s in range(0, n, batch):
            at = f"epoch {epoch + 1}, views {s}-{min(s + batch, n) - 1}"
            rows.append(labels.teacher_logits(images, views, np.arange(s, min(s + batch, n)), at=at))
        labels.check()
        epoch_logits = _fits_fp16(torch.cat(rows), epoch, batch)  # checked once per epoch: one sync
        encoded = encode(epoch_logits.float().cpu(), recipe["top_k"])
        tmp = partial / f"epoch-{epoch:05d}.tmp"
        save_file(encoded, str(tmp))
        tmp.replace(partial / f"epoch-{epoch:05d}.safetensors")
        progress.update()
    progress.close()


def _fits_fp16(logits: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
    """An epoch's logits if fp16 storage can hold them (|x| <= 65504, else inf), or an error naming
    the first batch of views that cannot be stored."""
    largest = logits.abs().amax(1)
    if float(largest.max()) > torch.finfo(torch.float16).max:
        first = int((largest > torch.finfo(torch.float16).max).nonzero()[0]) // batch * batch
        at = f"epoch {epoch + 1}, views {first}-{min(first + batch, len(logits)) - 1}"
        raise DivergenceError(
            f"relabel: teacher logits up to {float(largest.max()):.3g} at {at} do not fit fp16 storage; such teachers are "
            "broken (rerun `fadrm squeeze` with a lower squeeze.lr), or use relabel.mode=online"
        )
    return logits


def _assemble(partial: Path, epochs: int) -> dict[str, torch.Tensor]:
    missing = [e for e in range(epochs) if not (partial / f"epoch-{e:05d}.safetensors").is_file()]
    if missing:
        raise MissingInputError(f"relabel: epochs {missing[:10]} are not labelled yet")
    per_epoch = [load_file(str(partial / f"epoch-{e:05d}.safetensors")) for e in range(epochs)]
    return {key: torch.stack([p[key] for p in per_epoch]) for key in per_epoch[0]}


def encode(logits: torch.Tensor, top_k: int | None) -> dict[str, torch.Tensor]:
    """Logits (N x C) as stored: fp16, or the top-k values and indices plus one fill value per
    view, chosen so that the classes left out keep their total probability at temperature 1."""
    if top_k is None:
        return {"logits": logits.half()}
    values, indices = logits.topk(top_k, dim=1)
    rest = logits.scatter(1, indices, float("-inf"))
    fill = torch.logsumexp(rest, dim=1) - np.log(logits.shape[1] - top_k)
    index_type = torch.int16 if logits.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
    return {"values": values.half(), "indices": indices.to(index_type), "fill": fill.half()}


def decode(parts: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """The logits (N x C, float) of :func:`encode`'s output."""
    if "logits" in parts:
        return parts["logits"].float()
    logits = parts["fill"].float()[:, None].expand(-1, num_classes).clone()
    return logits.scatter_(1, parts["indices"].long(), parts["values"].float())


class SoftLabels:
    """Views and teacher logits for any epoch, from stored labels or computed online."""

    def __init__(
        self, recipe: dict, data: Prepared, device: torch.device, teachers=None, stored: Path | None = None, precision: str = "auto"
    ):
        self.recipe, self.data, self.device = recipe, data, device
        self.teachers = teachers
        self.precision = resolve_precision(precision, device)
        self._path = stored
        self._file = safe_open(str(stored), framework="pt") if stored is not None else None
        # On CUDA a per-batch finiteness test of the teachers' logits would make the host wait for
        # the device at every batch: the flags are kept on the device and read by check() (once per
        # epoch, where relabel and evaluate sync anyway). Elsewhere they are tested at once.
        self.deferred = device.type == "cuda"
        self._pending: list[tuple[torch.Tensor, str, str]] = []

    @classmethod
    def open(cls, folder: Path, data: Prepared, device: torch.device, squeeze_dir: Path, precision: str = "auto") -> SoftLabels:
        if not (folder / RECIPE).is_file():
            raise MissingInputError(f"no soft labels in {folder}; run `fadrm relabel` first")
        recipe = read_json(folder / RECIPE)
        if recipe["mode"] == "stored":
            return cls(recipe, data, device, stored=folder / LABELS, precision=precision)
        return cls(recipe, data, device, teachers=load_teachers(squeeze_dir, data, device), precision=precision)

    @property
    def stored(self) -> bool:
        return self._file is not None

    @property
    def epochs(self) -> int:
        return self.recipe["epochs"]

    def views(self, epoch: int) -> Views:
        """Epoch ``epoch``'s views (evaluation past the recorded epochs cycles through them)."""
        r = self.recipe
        return sample_views(
            r["num_images"], r["size"], r["size"], r["seed"], epoch % self.epochs, r["batch_size"], tuple(r["crop_scale"]), r["cutmix"]
        )

    def render(self, images: torch.Tensor, views: Views, positions: np.ndarray) -> torch.Tensor:
        """The normalised views at ``positions`` of ``images`` (uint8, or floats in [0, 1])."""
        return self.data.normalize(render_views(images, views, positions, self.recipe["size"]))

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor, views: Views, positions: np.ndarray, at: str = "") -> torch.Tensor:
        """The teachers' averaged logits for these views, computed now (non-finite ones are refused:
        they come from broken teachers, and whatever learns from them would be blamed instead)."""
        x = self.render(images, views, positions)
        total = None
        for name, model in self.teachers:
            with autocast(self.device, self.precision):
                out = model(x).float()
            if self.deferred:
                self._pending.append((torch.isfinite(out).all(), name, at))
            elif not torch.isfinite(out).all():
                raise self._broken(name, at)
            total = out if total is None else total + out
        return total / len(self.teachers)

    def check(self) -> None:
        """Raise for the first non-finite teacher output since the last check (deferred mode: one sync)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for ok, (_, name, at) in zip(torch.stack([flag for flag, _, _ in pending]).tolist(), pending):
            if not ok:
                raise self._broken(name, at)

    @staticmethod
    def _broken(name: str, at: str) -> DivergenceError:
        return DivergenceError(
            f"soft labels: teacher {name} gave non-finite logits ({at or 'these views'}); the teacher in "
            "squeeze/ is broken: rerun `fadrm squeeze` (a lower squeeze.lr) and `fadrm relabel`"
        )

    def logits(self, epoch: int, images: torch.Tensor | None, views: Views, positions: np.ndarray, at: str = "") -> torch.Tensor:
        """The labels of the view records at ``positions`` (a contiguous range) of ``epoch``."""
        if self._file is None:
            return self.teacher_logits(images, views, positions, at=at)
        e, lo, hi = epoch % self.epochs, int(positions[0]), int(positions[-1]) + 1
        if hi - lo != len(positions):
            raise ValueError("stored labels are read for a contiguous range of view records")
        parts = {key: self._file.get_slice(key)[e, lo:hi] for key in self._file.keys()}
        out = decode(parts, self.recipe["num_classes"])
        if not torch.isfinite(out).all():  # checked on the host, slice by slice: the file may not fit in memory
            raise DamagedInputError(
                f"the soft labels in {self._path} hold non-finite values (epoch {e + 1}, views {lo}-{hi - 1}; made "
                "by broken teachers); rerun `fadrm squeeze` and `fadrm relabel`, or `fadrm run`"
            )
        return to_device(out, self.device)
