"""One validated configuration: ``params.yaml`` (+ a preset, + ``-S key=value`` overrides).

Resolution order, later wins::

    field defaults  <  params.yaml  <  preset  <  -S overrides

A preset is a named bundle of overrides stored as data in ``fadrm/presets/<name>.yaml``;
it is chosen with ``--preset NAME`` or the ``preset:`` key of ``params.yaml`` (so that
``dvc exp run -S preset=smoke`` works too). Every section is a frozen pydantic model that
rejects unknown keys, so a typo such as ``squeeze.epoch`` fails loudly, naming the valid keys.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fadrm.errors import ConfigError

Precision = Literal["auto", "fp32", "fp16", "bf16"]
Method = Literal["fadrm", "fadrm+", "sre2l", "rded", "random"]
Pair = tuple[float, float]


def _crop_scale(value: Pair) -> Pair:
    low, high = value
    if not 0 < low <= high <= 1:
        raise ValueError(
            f"a crop scale is (smallest, largest) share of the image with 0 < smallest <= largest <= 1, got ({low}, {high})"
        )
    return value


CropScale = Annotated[Pair, AfterValidator(_crop_scale)]


def _registered_arch(value: str) -> str:
    from fadrm.models import check_arch  # the registry needs torch; config loading should not wait for it

    check_arch(value)
    return value


ArchName = Annotated[str, AfterValidator(_registered_arch)]


class Section(BaseModel):
    """Base for every config section: frozen, typed, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    """Where the raw dataset comes from and how it is prepared."""

    source: Literal["builtin", "imagefolder", "tar", "torchvision"] = "builtin"
    path: str | None = Field(None, description="ImageFolder root, archive, or torchvision root")
    name: str | None = Field(
        None,
        description="dataset facts key (fadrm.data.facts) or a free name; None: cifar10 for builtin, else the folder or archive name",
    )
    test_split: Literal["auto", "val", "test"] = "auto"
    resolution: int | None = Field(
        None, ge=8, description="image side; None: builtin/torchvision from the facts table, else the images' own size"
    )
    cache: Literal["auto", "on", "off"] = Field("auto", description="uint8 cache; auto: <= 64 px")
    download: bool = Field(False, description="torchvision source: download when not present")
    workers: int = Field(0, ge=0, description="DataLoader workers for file-backed datasets")
    train_per_class: int | None = Field(None, ge=1, description="keep the first N training images per class")
    test_per_class: int | None = Field(None, ge=1, description="keep the first N test images per class")

    @field_validator("cache", mode="before")
    @classmethod
    def _yaml_booleans(cls, value):
        # YAML 1.1 reads a bare on/off as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class TeacherConfig(Section):
    """One teacher: an architecture and where its weights come from."""

    arch: ArchName = "convnet"
    weights: str | None = Field(None, description="None: train it; 'pretrained': timm weights (network); else a file path")


class SqueezeConfig(Section):
    """Teacher training (SGD, warmup + cosine, label smoothing, crop + flip)."""

    teachers: tuple[TeacherConfig, ...] = (TeacherConfig(),)
    epochs: int = Field(30, ge=0, description="0: the teacher stays untrained (a sanity baseline); 30: docs/default-vs-random.md")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    crop_padding: int = Field(4, ge=0, description="random-crop padding (cached small images)")
    precision: Precision = "auto"
    channels_last: bool = True
    eval_every: int = Field(0, ge=0, description="test every N epochs (0: only at the end)")

    @field_validator("teachers")
    @classmethod
    def _non_empty(cls, value: tuple[TeacherConfig, ...]) -> tuple[TeacherConfig, ...]:
        if not value:
            raise ValueError("at least one teacher is required")
        return value


class SelectConfig(Section):
    """Real-patch initialisation (RDED): candidates, crops, stitching factor."""

    candidates: int = Field(300, ge=1, description="real images drawn per class")
    crops_per_image: int = Field(5, ge=1)
    factor: int | None = Field(None, ge=1, description="patches per side; None: 2 at >=128 px, else 1")
    crop_scale: CropScale = (0.08, 1.0)
    batch_size: int = Field(500, ge=1, description="crops scored per teacher forward")
    pick: Literal["auto", "top", "spread"] = Field(
        "auto",
        description="which scored patches: `top`, the best (RDED's definition, and the paper's FADRM init); "
        "`spread`, evenly spaced over the ranking, easy to hard (after PSM's difficulty groups; ahead of `top` "
        "for FADRM on the built-in subset: docs/default-vs-random.md); `auto`: spread for the methods that "
        "recover (FADRM, FADRM+), top for RDED",
    )
    anchor_pool: int = Field(
        20, ge=0, description="next-best real patches kept per class as residual anchors (recover.anchor: nearest)"
    )


class RecoverConfig(Section):
    """Data residual matching: BN statistics + CE, residual merges, multi-resolution."""

    schedule: tuple[tuple[int, int], ...] | None = Field(
        None, description="((resolution, iterations), ...); None: 4 stages of `iterations` (FADRM.md)"
    )
    iterations: int = Field(100, ge=0, description="per stage, when schedule is None (paper: 500)")
    lr: float = Field(0.05, gt=0, description="paper: 0.25; 0.05 keeps the real patch at 32 px (FADRM.md)")
    alpha: float | tuple[float, ...] = Field(
        0.5,
        description="residual merge weight of the optimised image: one value for every merge, or a schedule of one "
        "per merge (K - 1 values for K stages, first merge first), e.g. [0.7, 0.5, 0.3]",
    )
    anchor: Literal["init", "nearest"] = Field(
        "init",
        description="what a merge pulls towards: the image's own real patch (FADRM), or the real patch of its "
        "class nearest to it at that stage (re-chosen anchors, as RETA)",
    )
    ce_weight: float = Field(1.0, ge=0)
    bn_weight: float = Field(0.01, ge=0, description="lambda_bn")
    first_bn_weight: float = Field(10.0, ge=0, description="w_1, the first BN layer's weight")
    bn_groups: int = Field(
        1,
        ge=1,
        description="difficulty groups (PSM): each image matches the BN statistics of real images as hard for the "
        "teacher as its initialisation (quantiles of the teacher's loss); 1: the running statistics (FADRM)",
    )
    bn_group_by: Literal["loss", "rank"] = Field(
        "loss",
        description="how an image finds its difficulty group: `loss`, where its initialisation's loss falls among the "
        "real images' quantiles (a set of uniformly easy patches all lands in the easiest group); `rank`, its rank "
        "among the images recovered with it, in equal shares (the batch's easiest quarter -> the easiest quarter's statistics)",
    )
    bn_group_images: int = Field(20000, ge=1, description="real training images (class-balanced sample) behind the groups")
    topology_weight: float = Field(
        0.0,
        ge=0,
        description="topology alignment (after RETA, components only): weight of the loss that matches each class's "
        "H0 persistence (minimum-spanning-tree edge lengths) in the teacher's features to that of real images; 0: off (FADRM)",
    )
    topology_images: int = Field(200, ge=2, description="real training images per class behind the topology targets")
    batch_size: int = Field(100, ge=1)
    jitter: int | None = Field(None, ge=0, description="circular shift; None: 4 below 128 px, else 32")
    crop_scale: CropScale | None = Field(
        None, description="random-resized-crop scale of the views; None: (0.5, 1) up to 64 px, else (0.08, 1)"
    )
    precision: Precision = "auto"
    log_every: int = Field(10, ge=1, description="record the loss every N iterations")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value: float | tuple[float, ...]):
        for weight in value if isinstance(value, tuple) else (value,):
            if not 0 <= weight <= 1:
                raise ValueError(f"a merge weight is between 0 and 1, got {weight}")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: tuple[tuple[int, int], ...] | None):
        if value is None:
            return value
        if not value:
            raise ValueError("schedule must list at least one (resolution, iterations) pair")
        for res, iters in value:
            if res < 8 or iters < 0:
                raise ValueError(f"bad schedule entry ({res}, {iters}): resolution >= 8, iterations >= 0")
        return value


class RelabelConfig(Section):
    """FKD-style soft labels for recorded augmented views."""

    mode: Literal["stored", "online"] = "stored"
    epochs: int = Field(200, ge=1, description="epochs of views (evaluation cycles through them)")
    batch_size: int = Field(10, ge=1, description="views CutMix-ed together (one box per group): best equal to evaluate.batch_size")
    crop_scale: CropScale | None = Field(
        None, description="views' random-resized-crop scale; None: (0.25, 1) up to 64 px, else (0.08, 1)"
    )
    cutmix: bool = True
    top_k: int | None = Field(
        None, ge=1, description="stored mode: keep the k largest logits per view (+ one fill value); None: all, fp16"
    )
    precision: Precision = "auto"


class EvaluateConfig(Section):
    """Student training on the distilled set and test on the real split."""

    student: ArchName = "convnet"
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(10, ge=1, description="micro-batch (small batches: more steps on few images)")
    accumulate: int = Field(1, ge=1, description="micro-batches per optimiser step")
    lr: float = Field(0.001, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    temperature: float = Field(4.0, gt=0)
    final_lr_fraction: float = Field(0.0, ge=0, le=1, description="cosine ends at lr * this")
    labels: Literal["soft", "hard"] = "soft"
    eval_every: int = Field(25, ge=1, description="test every N epochs (and after the last)")
    test_batch_size: int = Field(500, ge=1)
    precision: Precision = "auto"


class TrackingConfig(Section):
    """Experiment tracking (MLflow). The core never imports MLflow; see fadrm.tracking."""

    enabled: bool = True
    uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = "fadrm"
    on_unreachable: Literal["fail", "continue"] = "fail"
    log_every: int = Field(10, ge=1, description="log loop metrics every N steps/epochs")


class RegressionConfig(Section):
    """Scheduled regression checks: which metrics, which tolerances, which baseline."""

    baseline: str = Field("benchmarks/baselines/smoke.json", description="file or mlflow:<run id|tag>")
    preset: str = "smoke"
    tolerances: dict[str, float] = Field(
        default_factory=lambda: {"student_top1": 0.05, "teacher_top1": 0.06, "recover_psnr": 1.7},
        description="metric -> largest allowed drop (absolute; benchmarks/baselines/README.md)",
    )


class Config(Section):
    """The whole, resolved configuration."""

    preset: str | None = None
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    out_dir: str = "outputs"
    method: Method = "fadrm"
    ipc: int = Field(10, ge=1, description="synthetic images per class")
    data: DataConfig = DataConfig()
    squeeze: SqueezeConfig = SqueezeConfig()
    select: SelectConfig = SelectConfig()
    recover: RecoverConfig = RecoverConfig()
    relabel: RelabelConfig = RelabelConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    regression: RegressionConfig = RegressionConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        source, path = self.data.source, self.data.path
        if source in ("imagefolder", "tar") and not path:
            raise ValueError(f"data.path is required when data.source is '{source}'")
        if source == "torchvision" and self.data.name not in ("cifar10", "cifar100"):
            raise ValueError(f"data.name must be cifar10 or cifar100 when data.source is 'torchvision' (got {self.data.name!r})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def sections(self, names: tuple[str, ...]) -> dict[str, Any]:
        full = self.to_dict()
        return {name: full[name] for name in names}

    def values(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """``{'data.source': 'builtin', 'squeeze': {...}, ...}``: the value of each dotted key."""
        full = self.to_dict()
        out = {}
        for key in keys:
            node: Any = full
            for part in key.split("."):
                node = node[part]
            out[key] = node
        return out


# The params each stage reads, as dotted keys (a section name stands for every key in it). The
# stage fingerprint, the per-stage resolved config and the `params:` lists of dvc.yaml all come
# from this one table (`fadrm dvc-yaml` writes them; a test fails when they drift). `preset` is
# listed because DVC cannot see what a preset named in params.yaml sets.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": (
        "preset",
        "data.source",
        "data.path",
        "data.name",
        "data.test_split",
        "data.resolution",
        "data.cache",
        "data.download",
        "data.train_per_class",
        "data.test_per_class",
    ),
    "squeeze": ("preset", "seed", "squeeze"),
    "select": ("preset", "seed", "method", "ipc", "select"),
    "recover": ("preset", "seed", "method", "recover"),
    "relabel": ("preset", "seed", "relabel"),
    "evaluate": ("preset", "seed", "evaluate"),
}

# Keys no stage output depends on: where and how fast things run, and what is logged where.
# `device` is here on purpose: CPU and GPU give outputs that differ only in rounding, and a
# stage record names the device it ran on. Every key of the config is in exactly one of
# STAGE_PARAMS or OPERATIONAL_PARAMS (a test checks it, so a new key needs a decision).
OPERATIONAL_PARAMS: tuple[str, ...] = ("device", "out_dir", "data.workers", "tracking", "regression")


def fingerprint(payload: Any) -> str:
    """Stable sha256 of a JSON-able value."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- loading


def available_presets() -> list[str]:
    folder = resources.files("fadrm") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict[str, Any]:
    path = resources.files("fadrm") / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(available_presets())}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset '{name}' is not a mapping")
    return data


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge ``top`` into a copy of ``base``; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'recover.alpha=0.7'`` -> (['recover', 'alpha'], 0.7); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form key.path=value (e.g. squeeze.epochs=5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, text)]
            continue
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            where = ".".join(path[: i + 1])
            raise ConfigError(f"override '{text}': '{where}' is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, text)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, text: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override '{text}': '{part}' is not an index of a list of {len(node)}")
    return int(part)


def _defaults_with_lists() -> dict[str, Any]:
    """Defaults as plain data, so overrides can index into default lists (teachers.0.arch)."""
    return Config.model_construct().model_dump(mode="json")


def load_config(
    params: str | Path | None = "params.yaml",
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    params_required: bool = False,
) -> Config:
    """Read ``params`` (if it exists), apply ``preset`` and ``overrides``, validate.

    A missing ``params`` file is an error only when ``params_required`` (the user named it).
    """
    data: dict[str, Any] = {}
    if params is not None:
        path = Path(params)
        if path.is_file():
            try:
                loaded = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError(f"{path}: top level must be a mapping of sections")
            data = loaded or {}
        elif params_required:
            raise ConfigError(f"params file not found: {path}")
    parsed = [(text, *parse_override(text)) for text in overrides]
    # --preset beats the file's preset key, and an override of `preset` beats both.
    chosen = preset or data.get("preset")
    for _, keys, value in parsed:
        if keys == ["preset"]:
            chosen = value
    if chosen:
        data = deep_merge(data, read_preset(str(chosen)))
        data["preset"] = str(chosen)
    merged = deep_merge(_defaults_with_lists(), data)
    for text, keys, value in parsed:
        apply_override(merged, keys, value, text)
    return validate(merged)


def validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        where = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent, key = loc[:-1], loc[-1]
            valid = _valid_keys(parent)
            hint = difflib.get_close_matches(key, valid, n=1)
            msg = f"unknown key '{where}'"
            if hint:
                msg += f" — did you mean '{'.'.join(parent + [hint[0]])}'?"
            msg += f" Valid keys{' in ' + repr('.'.join(parent)) if parent else ''}: {', '.join(valid)}"
            lines.append(msg)
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"'{where}': {err['msg']}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _valid_keys(parent: list[str]) -> list[str]:
    model: Any = Config
    for part in parent:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def dump_yaml(cfg: Config | dict[str, Any]) -> str:
    data = cfg.to_dict() if isinstance(cfg, Config) else cfg
    return yaml.safe_dump(data, sort_keys=False)
