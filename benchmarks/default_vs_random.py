"""The README's main job (params.yaml on the built-in subset): FADRM against random real images, over seeds.

    python benchmarks/default_vs_random.py              # seeds 0 1 2
    python benchmarks/default_vs_random.py --seeds 0 1 2 3
    python benchmarks/default_vs_random.py --variant rded=rded --variant lr01=fadrm,recover.lr=0.01,select.crop_scale=[0.5,1]

A variant is NAME=METHOD[,KEY=VALUE...]: one more column, run on the same prepared data and
teacher as the seed's params.yaml run; `fadrm` and `random` (params.yaml as it is) always run.

Per seed, the whole pipeline of params.yaml runs once with FADRM; the random-real-images run of
the same seed then reuses its prepared data and teacher (the same files, so the comparison holds
the teacher fixed) and redoes select, recover (a pass-through), relabel and evaluate under the same
protocol. Resumable: finished cells are kept in docs/benchmarks/default-vs-random.json; the table
goes to docs/default-vs-random.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench" / "default-vs-random"
RESULTS = ROOT / "docs" / "benchmarks" / "default-vs-random.json"
DOC = ROOT / "docs" / "default-vs-random.md"
METHODS = ("fadrm", "random")
HEAD = "| column | method | overrides | mean ± std | n | minus random images, same teacher and protocol (IPC, labels): mean ± std |"
STAGES = ("prepare", "squeeze", "select", "recover", "relabel", "evaluate")


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    name, _, spec = text.partition("=")
    method, *overrides = re.split(r",(?![^\[]*\])", spec)  # commas inside [..] belong to a value
    if not name or not method:
        raise SystemExit(f"--variant {text!r}: expected NAME=METHOD[,KEY=VALUE...]")
    return name, method, overrides


def cell_config(method: str, seed: int, out: Path, overrides: list[str]):
    from fadrm.config import load_config

    base = [f"method={method}", f"seed={seed}", f"out_dir={out}", "tracking.enabled=false"]
    return load_config(ROOT / "params.yaml", None, base + overrides)


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fingerprint(cfg) -> str:
    """What a cell's figure depends on (a params.yaml edit reruns the cells it touches)."""
    import hashlib

    from fadrm.config import Config

    # only what differs from the built-in defaults: a new setting (at its default) keeps old cells
    dump = flat(cfg.model_dump(mode="json"))
    defaults = flat(Config().model_dump(mode="json"))
    dump = {k: v for k, v in dump.items() if defaults.get(k, object()) != v and k.split(".")[0] not in ("out_dir", "tracking")}
    if cfg.method in ("random", "rded"):  # no recovery: its settings do not touch the figure
        dump = {k: v for k, v in dump.items() if not k.startswith("recover.")}
    if cfg.method == "random":  # nor do the patch selection's
        dump = {k: v for k, v in dump.items() if not k.startswith("select.")}
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def teacher_key(overrides: list[str]) -> tuple[str, ...]:
    """The overrides that decide the prepared data and the teacher."""
    return tuple(sorted(o for o in overrides if o.startswith(("data.", "squeeze."))))


def base_for(name: str, seed: int, overrides: list[str], results: dict) -> Path:
    """A finished run of this seed with the same data and teacher settings to start from (the
    first such variant trains the teacher; the others reuse it), else FADRM's run of the seed."""
    key = teacher_key(overrides)
    for record in reversed(list(results.values())):  # the latest: made by the code most like today's
        same = record["seed"] == seed and teacher_key(record["overrides"]) == key
        if key and same and record["variant"] not in ("fadrm", name) and (OUT / f"{record['variant']}-s{seed}").is_dir():
            return OUT / f"{record['variant']}-s{seed}"
    return OUT / f"fadrm-s{seed}"


def run_cell(name: str, method: str, seed: int, overrides: list[str], base: Path | None = None) -> dict:
    from fadrm.pipeline import run_pipeline

    out = OUT / f"{name}-s{seed}"
    if name != "fadrm":
        # Start from FADRM's run of this seed (hard links): the pipeline's lineage then redoes exactly
        # the stages this variant changes -- the same prepared data and teacher for every column, and
        # e.g. a hard-label variant re-evaluates FADRM's own images.
        base = base or OUT / f"fadrm-s{seed}"
        if base.name == f"fadrm-s{seed}":
            run_pipeline(cell_config("fadrm", seed, base, []), until="squeeze")  # current (after a code change: redone once)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "metrics").mkdir()
        for stage in STAGES:
            if (base / stage).is_dir() and (base / "metrics" / f"{stage}.json").is_file():
                shutil.copytree(base / stage, out / stage, copy_function=os.link)
                shutil.copy(base / "metrics" / f"{stage}.json", out / "metrics" / f"{stage}.json")
    cfg = cell_config(method, seed, out, overrides)
    start = time.perf_counter()
    summary = run_pipeline(cfg)
    return {
        "variant": name,
        "overrides": overrides,
        "config": fingerprint(cfg),
        "method": method,
        "seed": seed,
        "top1": summary["student_top1"],
        "teacher_top1": summary["teacher_top1"],
        "teacher_sha256": json.loads((out / "metrics" / "squeeze.json").read_text())["teacher_sha256"],
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD[,KEY=VALUE...]")
    args = parser.parse_args()
    variants = [(m, m, []) for m in METHODS] + [parse_variant(v) for v in args.variant]
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for seed in args.seeds:
        for name, method, overrides in variants:
            key = f"{name} seed {seed}"
            wanted = fingerprint(cell_config(method, seed, OUT / "-", overrides))
            if results.get(key, {}).get("config") == wanted:
                continue
            results[key] = run_cell(name, method, seed, overrides, base_for(name, seed, overrides, results))
            print(json.dumps({key: results[key]}), flush=True)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    render(results)


def protocol(overrides: list[str]) -> tuple[str, ...]:
    """The overrides that are not the set's making (select, recover): IPC, teacher, labels, student."""
    return tuple(sorted(o for o in overrides if not o.startswith(("select.", "recover."))))


def random_reference(results: dict, record: dict) -> dict | None:
    """Random real images of the record's seed under the same teacher and the same protocol
    (the same IPC, relabel and evaluate settings: a hard-label column is compared with hard labels)."""
    for r in results.values():
        same = r["seed"] == record["seed"] and r["teacher_sha256"] == record["teacher_sha256"]
        if r["method"] == "random" and same and protocol(r["overrides"]) == protocol(record["overrides"]):
            return r
    return None


def dd_ranking(results: dict) -> list[str]:
    """DD-Ranking's scores for each method with a `<method>-hard` column (the same set, hard labels)."""
    from grid_report import lrs

    out = []
    for name in ("fadrm", "random", "rded"):
        rows = []
        for seed in sorted({r["seed"] for r in results.values()}):
            soft, hard = results.get(f"{name} seed {seed}"), results.get(f"{name}-hard seed {seed}")
            rand = results.get(f"random seed {seed}")
            if soft and hard and rand:
                # full real data with hard labels: the teacher is that (same ConvNet, the whole subset)
                hlr, ior = soft["teacher_top1"] - hard["top1"], soft["top1"] - rand["top1"]
                rows.append((seed, hard["top1"], hlr, ior, lrs(ior, hlr)))
        if not rows:
            continue
        out += [
            "",
            f"DD-Ranking scores, {name} (hard-label recovery HLR = full data, hard labels - this set, hard labels; "
            "improvement over random IOR = this set - random real images, soft labels; label-robust score LRS; "
            "full-data accuracy = the teacher's: the same ConvNet trained on the whole subset with hard labels):",
            "",
            "| seed | hard-label top-1 | HLR | IOR | LRS |",
            "|---|---|---|---|---|",
        ]
        out += [f"| {s} | {100 * h:.1f}% | {100 * hl:+.1f} | {100 * io:+.1f} | {100 * sc:.2f} |" for s, h, hl, io, sc in rows]
        if len(rows) > 1:
            cols = list(zip(*rows))
            fmt = [f"{100 * statistics.mean(c):.2f} ± {100 * statistics.stdev(c):.2f}" for c in cols[1:]]
            out.append(f"| mean ± std (n={len(rows)}) | " + " | ".join(fmt) + " |")
    return out


def render(results: dict) -> None:
    import torch

    names = list(dict.fromkeys(["fadrm", "random"] + [r["variant"] for r in results.values()]))
    label = {"fadrm": "FADRM (params.yaml)", "random": "random real images"}
    lines = [
        "# The README's main job: FADRM against random real images",
        "",
        "Written by `python benchmarks/default_vs_random.py` (data: `docs/benchmarks/default-vs-random.json`): "
        "`params.yaml` as `fadrm run` uses it (the built-in 6,000-image CIFAR-10 subset, IPC 10), one teacher per "
        "seed shared by every column, the same relabel/evaluate protocol. Student top-1 after the last epoch; "
        f"measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}. Other columns: `--variant NAME=METHOD[,KEY=VALUE...]` (overrides below; "
        "columns named `*-sq10` keep the earlier default's 10-epoch teacher, `*top*` FADRM on the earlier default's "
        "`select.pick=top`; RDED picks top by its definition, `rded-spread` takes the spread patches without recovery).",
        "",
        "| seed | teacher | " + " | ".join(label.get(n, n) for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    seeds = sorted({r["seed"] for r in results.values()})
    for seed in seeds:
        cells = [results.get(f"{n} seed {seed}") for n in names]
        teacher = next((c["teacher_top1"] for c in cells if c), None)
        row = [f"{100 * c['top1']:.1f}%" if c else "-" for c in cells]
        lines.append(f"| {seed} | {100 * teacher:.1f}% | " + " | ".join(row) + " |")
    lines += ["", HEAD, "|---|---|---|---|---|---|"]
    for name in names:
        mine = {r["seed"]: r for r in results.values() if r["variant"] == name}
        if not mine:
            continue
        values = [r["top1"] for r in mine.values()]
        spread = (
            f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}%"
            if len(values) > 1
            else f"{100 * values[0]:.1f}%"
        )
        refs = {s: random_reference(results, r) for s, r in mine.items()}
        gaps = [100 * (r["top1"] - refs[s]["top1"]) for s, r in mine.items() if refs[s] and refs[s] is not r]
        gap = (
            "-"
            if not gaps
            else (f"{statistics.mean(gaps):+.1f} ± {statistics.stdev(gaps):.1f}" if len(gaps) > 1 else f"{gaps[0]:+.1f}")
        )
        overrides = ", ".join(f"`{o}`" for o in next(iter(mine.values()))["overrides"]) or "params.yaml"
        lines.append(
            f"| {label.get(name, name)} | {next(iter(mine.values()))['method']} | {overrides} | {spread} | {len(values)} | {gap} |"
        )
    lines += dd_ranking(results)
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
