"""Device and numeric precision, chosen once and passed down (CUDA, MPS or CPU)."""

from __future__ import annotations

import contextlib
import os

import torch

from fadrm.errors import ConfigError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA (the local rank's GPU under torchrun), then MPS, then CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available here (use device: auto or cpu)")
    if device.type == "cuda" and device.index is None:  # plain "cuda": the local rank's GPU under torchrun
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


# Stages that train fixed-shape batches for many steps: cuDNN's autotuner pays for itself there.
# Select, recover and relabel keep the default heuristics, whose choice does not vary run to run
# (on CUDA their bytes still can: grid_sample's backward adds atomically, see README "Scaling").
AUTOTUNED_STAGES = ("squeeze", "evaluate")


def configure_backends(device: torch.device, stage: str) -> None:
    """``torch.backends.cudnn.benchmark`` on for the training stages on CUDA, off otherwise."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = stage in AUTOTUNED_STAGES


def to_device(data, device: torch.device | str) -> torch.Tensor:
    """A host array or tensor on ``device``. On CUDA the copy goes through pinned memory and does not
    block the host (a pageable copy waits for the stream: one host sync per batch). PyTorch's caching
    host allocator reuses the pinned block and keeps it alive until the copy has run."""
    t, device = torch.as_tensor(data), torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it, else fp16 on CUDA; fp32 elsewhere (CPU, MPS)."""
    if precision != "auto":
        if precision != "fp32" and device.type != "cuda":
            raise ConfigError(f"precision '{precision}' needs a CUDA device; {device.type} runs fp32")
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling is needed for fp16 only (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
