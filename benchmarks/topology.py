"""How far a distilled set's spacing in the teacher's feature space is from real images' (pull-to-anchor).

    python benchmarks/topology.py outputs/bench/grid-cpu/variants/teacher-e6/sets/random-ipc10-s0 ...
    python benchmarks/topology.py doc            # re-render the table from the JSON

RETA (CVPR 2026) argues that residual matching pulls each image towards its real anchor, so a
class's images end up closer together than real images are, and adds a topology loss against it
(``recover.topology_weight`` is ours, components only). This measures the premise on grid cells:
per class, the H0 persistence of the set's features (the edge lengths of their minimum spanning
tree, ``fadrm.losses.mst_lengths``) under the cell's own teacher, summed, against the same sum for
random real subsets of the same size (the mean over ``--draws`` subsets of ``--real`` training
images per class). A ratio below 1 means the set is more tightly packed than real images; both
the initial patches (``select``) and the recovered images (``recover``) are measured. Features
are of the plain images (no views). Records go to docs/benchmarks/topology.json (one per cell
and stage, replaced when measured again), the table to docs/topology.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "docs" / "benchmarks" / "topology.json"
DOC = ROOT / "docs" / "topology.md"

from fadrm.methods import METHODS  # noqa: E402

GRID_RECORDS = ROOT / "docs" / "benchmarks" / "cifar10-cpu.json"


@torch.no_grad()
def features(model, tap, data, images: torch.Tensor, device) -> torch.Tensor:
    out = []
    for s in range(0, len(images), 500):
        model(data.to_input(images[s : s + 500], device))
        out.append(tap.pop().float().cpu())
    return torch.cat(out)


def class_sums(points: torch.Tensor, labels: np.ndarray) -> list[float]:
    from fadrm.losses import mst_lengths

    return [mst_lengths(points[torch.from_numpy(labels == c)]).sum().item() for c in np.unique(labels)]


def measure(cell: Path, real: int, draws: int, device) -> list[dict]:
    from fadrm.data.prepared import Prepared
    from fadrm.distilled import load_set
    from fadrm.losses import FeatureTap, mst_lengths
    from fadrm.teachers import load_teachers

    data = Prepared(cell / "prepare")
    (name, model), *_ = load_teachers(cell / "squeeze", data, device, which="first")
    tap = FeatureTap(model)
    train, rng = data.split("train"), np.random.default_rng(0)
    pools = {}
    for c in range(data.num_classes):
        idx = np.sort(rng.permutation(train.class_indices(c))[:real])
        pools[c] = features(model, tap, data, train.load(idx, data.resolution), device)
    sets = {stage: load_set(cell / stage) for stage in ("select", "recover")}
    ipc = int(np.bincount(sets["select"][1]).max())
    draw = np.random.default_rng([1, ipc])  # each class's mean sum over random real subsets of the set's size
    want = [
        statistics.fmean(mst_lengths(pool[draw.permutation(len(pool))[:ipc]]).sum().item() for _ in range(draws))
        for pool in pools.values()
    ]
    records = []
    for stage, (images, labels, manifest) in sets.items():
        got = class_sums(features(model, tap, data, images, device), labels)
        records.append(
            {
                "cell": str(cell.relative_to(ROOT)) if cell.is_relative_to(ROOT) else str(cell),
                "method": manifest.get("method", "?"),
                "stage": stage,
                "ipc": ipc,
                "teacher": name,
                "set_mst_sum": round(statistics.fmean(got), 4),
                "real_mst_sum": round(statistics.fmean(want), 4),
                "ratio": round(statistics.fmean(g / w for g, w in zip(got, want, strict=True)), 4),
                "real_per_class": real,
                "draws": draws,
            }
        )
    tap.remove()
    return records


def renamed_variants(grid_records: Path = GRID_RECORDS) -> frozenset[str]:
    """Variant folders whose cells became the grid's plain cells (their records carry ``renamed_from``)."""
    records = json.loads(grid_records.read_text()) if grid_records.is_file() else []
    return frozenset(r["renamed_from"] for r in records if r.get("renamed_from") and not r.get("variant"))


def group_of(record: dict, plain: frozenset[str] = frozenset()) -> str:
    """The cell's name without its seed, under the grid's current names: `variants/X/sets/fadrm-ipc10-s0` ->
    `X fadrm-ipc10`, `plain fadrm-ipc10` for a plain cell or one of a variant in ``plain``."""
    parts = Path(record["cell"]).parts
    variant = parts[parts.index("variants") + 1] if "variants" in parts else None
    return f"{'plain' if variant is None or variant in plain else variant} {parts[-1].rsplit('-s', 1)[0]}"


def render(records: list[dict], plain: frozenset[str] = frozenset()) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r["stage"] == "recover" and r["method"] in METHODS and not METHODS[r["method"]].recover:
            continue  # its `recover` output is its selection, measured once as `select`
        groups.setdefault((group_of(r, plain), r["stage"]), []).append(r)
    lines = [
        "# Feature-space spacing of distilled sets against real images",
        "",
        "Per class, the sum of the H0 death times (minimum-spanning-tree edge lengths) of the set's features under",
        "its cell's teacher, divided by the same sum for random real subsets of the same size (mean over draws),",
        "then averaged over classes: below 1, the set's images sit closer together than real images do (RETA's",
        "pull-to-anchor effect). `select` is the initial real patches, `recover` the recovered images (random and",
        "RDED recover nothing: their rows are their selection). Cells under the grid's current names (`plain`: the",
        "main tables' cells, including those made as a variant that became them). Mean ± std over the seeds (n).",
        "Written by `python benchmarks/topology.py CELL...` (records in docs/benchmarks/topology.json).",
        "",
        "| variant, cell | stage | ratio to real | set sum | real sum | n |",
        "|---|---|---|---|---|---|",
    ]

    def pm(values: list[float]) -> str:
        return f"{statistics.fmean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

    for (group, stage), rows in sorted(groups.items()):
        lines.append(
            f"| {group} | {stage} | {pm([r['ratio'] for r in rows])} | {pm([r['set_mst_sum'] for r in rows])} "
            f"| {pm([r['real_mst_sum'] for r in rows])} | {len(rows)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cells", nargs="+", help="grid cell folders (with prepare/, squeeze/, select/, recover/), or `doc`")
    parser.add_argument("--real", type=int, default=500, help="real training images per class behind the reference")
    parser.add_argument("--draws", type=int, default=50, help="random real subsets per class")
    args = parser.parse_args()
    records = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    if args.cells != ["doc"]:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for cell in args.cells:
            new = measure(Path(cell).resolve(), args.real, args.draws, device)
            keys = {(r["cell"], r["stage"]) for r in new}
            records = [r for r in records if (r["cell"], r["stage"]) not in keys] + new
            for r in new:
                print(f"{r['cell']} {r['stage']}: ratio {r['ratio']:.3f} ({r['set_mst_sum']:.2f} / {r['real_mst_sum']:.2f})")
        RESULTS.write_text(json.dumps(records, indent=1) + "\n")
    DOC.write_text(render(records, renamed_variants()))
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
