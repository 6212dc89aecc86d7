"""Loading the teachers that the squeeze stage saved, for every stage that needs them.

select, recover and relabel (and evaluation with online soft labels) read the same
``<out>/squeeze`` folder: ``teachers.json`` lists the saved models, each a safetensors file
with a JSON card. Keeping the reader here, beside neither stage, means no stage module
imports another.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fadrm.data.prepared import Prepared
from fadrm.errors import MissingInputError
from fadrm.io import read_json
from fadrm.models import create_model
from fadrm.weights import load_weights

TEACHERS = "teachers.json"


def load_teachers(squeeze_dir: Path, data: Prepared, device: torch.device, which: str = "all") -> list[tuple[str, nn.Module]]:
    """The saved teachers (``which``: 'all' or 'first'), in eval mode on ``device``, frozen."""
    listing = squeeze_dir / TEACHERS
    if not listing.is_file():
        raise MissingInputError(f"no {TEACHERS} in {squeeze_dir}; run `fadrm squeeze` first")
    cards = read_json(listing)
    if which == "first":
        cards = cards[:1]
    teachers = []
    for card in cards:
        model = create_model(card["arch"], data.num_classes, data.resolution)
        load_weights(model, squeeze_dir / card["file"])
        teachers.append((card["name"], model.to(device).eval().requires_grad_(False)))
    return teachers
