"""fadrm — FADRM dataset distillation as a reproducible workflow.

The core package (everything under ``fadrm/`` except ``cli.py`` and ``tracking.py``)
depends only on torch, torchvision, timm, numpy, Pillow, pydantic and PyYAML. Each stage
is one plain function (``fadrm.stages``) that the CLI, DVC and Prefect call alike::

    from fadrm.config import load_config
    from fadrm.pipeline import run_pipeline

    cfg = load_config(preset="smoke")
    summary = run_pipeline(cfg)
"""

__version__ = "0.1.0"
