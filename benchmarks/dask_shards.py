"""Recovery split over a local Dask cluster of 1 and of 2 workers: wall time and orchestration cost.

    python benchmarks/dask_shards.py                 # the smoke preset, heavier recovery
    python benchmarks/dask_shards.py --workers 1 2 4

Prepares, trains the teacher and selects once (in this process), then runs only recover's shards
through ``flows.sharding.run_shards`` (a Prefect subflow on a ``local:N`` prefect-dask cluster,
one shard per worker) from an empty partial folder, for each worker count. Per run: the wall time,
the compute time inside the shards (their own timers) and the rest — cluster start, task
submission, result collection — as the orchestration cost, in total and per shard. Every run's
images are compared with the first run's (they must be identical). Writes
docs/benchmarks/dask_shards.json and the table in docs/dask.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench" / "dask-shards"
RESULTS = ROOT / "docs" / "benchmarks" / "dask_shards.json"
DOC = ROOT / "docs" / "dask.md"
OVERRIDES = ["ipc=10", "recover.schedule=[[32,100],[32,100]]", "recover.batch_size=20", "tracking.enabled=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    from fadrm.config import load_config
    from fadrm.pipeline import run_pipeline
    from fadrm.stage import Layout
    from flows.sharding import run_shards

    cfg = load_config(None, "smoke", [f"out_dir={OUT}", *OVERRIDES])
    run_pipeline(cfg, until="select")
    layout = Layout.of(cfg)
    rows, reference = [], None
    with prefect_test_harness(server_startup_timeout=120):
        for workers in args.workers:
            shutil.rmtree(layout.partial("recover"), ignore_errors=True)
            start = time.perf_counter()
            results = run_shards("recover", cfg, f"local:{workers}")
            wall = time.perf_counter() - start
            compute = [r["s_per_image"] * r["recovered_images"] for r in results if r["recovered_images"]]
            batches = sorted(layout.partial("recover").rglob("batch-*.pt"))
            images = torch.cat([torch.load(b, weights_only=True)["images"] for b in batches])
            same = reference is None or torch.equal(images, reference)
            reference = images if reference is None else reference
            rows.append(
                {
                    "workers": workers,
                    "shards": len(results),
                    "images": int(images.shape[0]),
                    "wall_s": round(wall, 1),
                    "slowest_shard_s": round(max(compute), 1),
                    "shard_compute_s": round(sum(compute), 1),
                    "orchestration_s": round(wall - max(compute), 1),
                    "orchestration_per_shard_s": round((wall - max(compute)) / len(results), 1),
                    "identical_images": same,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    record = {
        "config": {"preset": "smoke", "overrides": OVERRIDES},
        "machine": f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}",
        "measured": time.strftime("%Y-%m-%d"),
        "runs": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Recovery shards on a local Dask cluster",
        "",
        "Written by `python benchmarks/dask_shards.py` (data: `docs/benchmarks/dask_shards.json`): recover's shards "
        "run through `fadrm run --dask local:N`'s code path (a Prefect subflow on a prefect-dask cluster, one shard per "
        f"worker), the smoke preset with {' '.join(OVERRIDES[:3])}. Machine: {record['machine']}. Orchestration = wall "
        "time minus the slowest shard's own compute time (cluster start, task submission, results).",
        "",
        "| workers | shards | images | wall s | slowest shard s | compute s (all shards) | orchestration s | per shard s "
        "| images identical to 1 worker |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['shards']} | {r['images']} | {r['wall_s']} | {r['slowest_shard_s']} | "
            f"{r['shard_compute_s']} | {r['orchestration_s']} | {r['orchestration_per_shard_s']} | "
            f"{'yes' if r['identical_images'] else '**no**'} |"
        )
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
