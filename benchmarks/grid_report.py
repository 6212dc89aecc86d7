"""docs/benchmarks.md from the grid's records (benchmarks/grid.py): mean ± std over seeds per
cell, hard-label accuracy and DD-Ranking's scores, the paper's figures beside ours.

DD-Ranking (Li et al., 2025) separates what the images carry from what the teacher's labels
carry, per IPC and student:

- hard-label recovery  HLR = acc(full real data, hard labels) - acc(distilled set, hard labels)   (lower is better)
- improvement over random  IOR = acc(distilled set, soft) - acc(random real images, soft)          (higher is better;
  here paired: the same seed's random images, averaged over the seeds both have)
- label-robust score  LRS = (exp(a) - 1/e) / (e - 1/e),  a = w IOR - (1 - w) HLR,  w = 0.5 (accuracies as fractions)

The full-data accuracy of an architecture is its best teacher's in the records: the same
architecture trained on the whole training split with (smoothed) hard labels by ``fadrm squeeze``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

METHODS = ("random", "rded", "sre2l", "fadrm", "fadrm+")
STUDENT_NAMES = {"convnet": "ConvNet-64", "resnet18": "ResNet-18"}
ARCH_NAMES = {**STUDENT_NAMES, "resnet20": "ResNet-20"}
# Published CIFAR-10 figures (top-1 %, ResNet-18 student) from the PSM paper's table (FADRM.md):
# GPU, ResNet-18 teachers trained to ~95%, longer student training; not this protocol.
PAPER = {"rded": {1: 22.9, 10: 37.1, 50: 62.1}, "fadrm": {1: 19.3, 10: 48.2, 50: 80.6}, "fadrm+": {1: 23.7, 10: 55.9, 50: 85.8}}


def lrs(ior: float, hlr: float, w: float = 0.5) -> float:
    a = w * ior - (1 - w) * hlr
    return (math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1))


def _stats(values: list[float]) -> tuple[float, float, int]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std, n = _stats(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f} (n={n})" if n > 1 else f"{100 * mean:.2f} (n=1, no spread yet)"


def _by_seed(records: list[dict]) -> dict[tuple, dict[int, float]]:
    """{(variant, ipc, method, student, labels): {seed: top1}}"""
    acc: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in records:
        acc[(r.get("variant") or "", r["ipc"], r["method"], r["student"], r["labels"])][r["seed"]] = r["top1"]
    return acc


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """a - b seed by seed, over the seeds both have."""
    return [a[s] - b[s] for s in sorted(a.keys() & b.keys())]


def summarise(records: list[dict], teachers: dict[str, dict]) -> dict:
    """{(ipc, method, student): {soft, hard, ior, hlr, lrs, ...}} from the plain (not variant) records.

    IOR is paired: the method minus random images of the same seed, over the seeds both have."""
    acc = _by_seed([r for r in records if not r.get("variant")])
    out = {}
    for _, ipc, method, student, labels in list(acc):
        if labels != "soft":
            continue
        soft, hard = acc[("", ipc, method, student, "soft")], acc.get(("", ipc, method, student, "hard"), {})
        row = {"soft": list(soft.values()), "hard": list(hard.values())}
        gains = paired(soft, acc.get(("", ipc, "random", student, "soft"), {}))
        if gains:
            row["ior"] = statistics.mean(gains)
            row["ior_n"] = len(gains)
        full = teachers.get(student, {}).get("top1")
        if hard and full is not None:
            row["hlr"] = full - statistics.mean(hard.values())
        if "ior" in row and "hlr" in row:
            row["lrs"] = lrs(row["ior"], row["hlr"])
        out[(ipc, method, student)] = row
    return out


def accuracy_series(records: list[dict]) -> dict[str, dict[str, dict[int, dict[str, list[float]]]]]:
    """What the figure plots, from the plain soft-label cells, in points:
    {student: {method: {ipc: {"top1": [per seed], "gain": [minus random images of the same seed]}}}}."""
    acc = _by_seed([r for r in records if not r.get("variant") and r["labels"] == "soft"])
    out: dict = defaultdict(lambda: defaultdict(dict))
    for (_, ipc, method, student, _), seeds in acc.items():
        random = acc.get(("", ipc, "random", student, "soft"), {})
        out[student][method][ipc] = {
            "top1": [100 * seeds[s] for s in sorted(seeds)],
            "gain": [100 * g for g in paired(seeds, random)] if method != "random" else [],
        }
    return {student: dict(methods) for student, methods in out.items()}


def plot_accuracy(records: list[dict], path: Path) -> Path | None:
    """A PNG: per student, top-1 by IPC for each method (mean ± std over seeds, each seed a dot) above
    its gain over random real images of the same seed. None when there is nothing to plot."""
    series = accuracy_series(records)
    if not series:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    students = [s for s in STUDENT_NAMES if s in series] + [s for s in series if s not in STUDENT_NAMES]
    ipcs = sorted({ipc for methods in series.values() for cells in methods.values() for ipc in cells})
    fig = Figure(figsize=(4.6 * len(students), 7.0), dpi=100)
    axes = fig.subplots(2, len(students), squeeze=False, sharex=True)
    for column, student in enumerate(students):
        top, gain = axes[0][column], axes[1][column]
        methods = [m for m in METHODS if m in series[student]]
        for k, method in enumerate(methods):
            cells = series[student][method]
            shift = 0.05 * (k - (len(methods) - 1) / 2)  # side by side, so error bars do not hide each other
            color = "0.45" if method == "random" else f"C{METHODS.index(method)}"  # one colour per method everywhere
            for ax, field in ((top, "top1"), (gain, "gain")):
                points = [(ipcs.index(ipc) + shift, cells[ipc][field]) for ipc in ipcs if cells.get(ipc, {}).get(field)]
                if not points:
                    continue
                xs = [x for x, _ in points]
                means, stds, _ = zip(*(_stats(values) for _, values in points), strict=True)
                ax.errorbar(xs, means, yerr=stds, color=color, marker="o", markersize=4, capsize=3, label=method)
                for x, values in points:
                    ax.scatter([x] * len(values), values, color=color, s=8, alpha=0.35, linewidths=0)
        top.set_title(f"{STUDENT_NAMES.get(student, student)} student, soft labels")
        top.set_ylabel("top-1 (%)")
        gain.axhline(0.0, color="0.45", linewidth=1, linestyle="--")
        gain.set_ylabel("minus random real images, same seed (points)")
        gain.set_xlabel("images per class (IPC)")
        gain.set_xticks(range(len(ipcs)), [str(ipc) for ipc in ipcs])
        for ax in (top, gain):
            ax.grid(alpha=0.3)
        top.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})  # the same records give the same bytes
    return path


def _by_variant(records: list[dict]) -> dict[str, list[dict]]:
    """The records per variant ("" for the plain cells)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r.get("variant") or ""].append(r)
    return groups


def _teachers_of(records: list[dict]) -> dict[str, dict]:
    """{arch: {"top1": ..., "elsewhere": {top1: [device, ...]}}} from the records' teachers (named ``<i>-<arch>``
    by squeeze): per architecture the top-1 most records carry, and the other figures the same teacher file
    (same sha256) got when it was measured again on another machine (bf16 on a GPU, fp32 on CPUs)."""
    tops: dict[str, list[float]] = defaultdict(list)
    measured: dict[str, dict[float, set]] = defaultdict(lambda: defaultdict(set))  # arch -> top1 -> (sha, device)
    for r in records:
        shas = r.get("teacher_sha256") or {}
        for name, top1 in (r.get("teachers") or {}).items():
            arch = name.split("-", 1)[-1]
            tops[arch].append(top1)
            measured[arch][top1].add((shas.get(name), r.get("device", "?")))
    figures = {}
    for arch, values in tops.items():
        top1 = max(set(values), key=values.count)
        files = {sha for sha, _ in measured[arch][top1]}
        elsewhere = {
            other: sorted({device for sha, device in where if sha in files})
            for other, where in measured[arch].items()
            if other != top1 and any(sha in files for sha, _ in where)
        }
        figures[arch] = {"top1": top1, "elsewhere": dict(sorted(elsewhere.items()))}
    return figures


def _teacher_figure(arch: str, figure: dict) -> str:
    again = "; ".join(f"{100 * top1:.2f}% on {', '.join(devices)}" for top1, devices in figure.get("elsewhere", {}).items())
    return f"{ARCH_NAMES.get(arch, arch)} {100 * figure['top1']:.2f}%" + (f" (measured again: {again})" if again else "")


def _full_data(records: list[dict]) -> dict[str, dict]:
    """DD-Ranking's full-data accuracy per architecture: the best of its teachers in the records (the
    plain cells' teacher is cut short on purpose, so it is not that figure)."""
    best: dict[str, dict] = {}
    for group in _by_variant(records).values():
        for arch, t in _teachers_of(group).items():
            if t["top1"] > best.get(arch, {"top1": -1.0})["top1"]:
                best[arch] = t
    return best


def _teacher_identity(records: list[dict], fadrm_plus: bool = False) -> tuple[frozenset, dict[str, float]]:
    """What identifies the teacher behind some records: its sha256 (where recorded) and top-1 per arch.

    FADRM+ cells add teachers of their own; the teacher is the one of every other method's cells, and
    with ``fadrm_plus`` the set of teachers behind the FADRM+ cells."""
    if fadrm_plus:
        records = [r for r in records if r["method"] == "fadrm+"]
    else:
        records = [r for r in records if r["method"] != "fadrm+"] or records
    shas = frozenset(s for r in records for s in (r.get("teacher_sha256") or {}).values())
    return shas, {arch: t["top1"] for arch, t in _teachers_of(records).items()}


def _same_teacher(a: tuple[frozenset, dict], b: tuple[frozenset, dict]) -> bool:
    if a[0] and b[0]:
        return a[0] == b[0]
    # no hash on one side (older records): the same architectures at the same accuracy (a re-measure on
    # another machine moved it by 0.02 points; two teachers of one recipe differed by 0.2)
    return a[1].keys() == b[1].keys() and all(abs(a[1][k] - b[1][k]) < 0.001 for k in a[1])


def variant_rows(records: list[dict]) -> list[str]:
    """A table of the variant cells, each against the plain cell of the same seeds."""
    acc = _by_seed(records)
    overrides = {r["variant"]: r.get("overrides", []) for r in records if r.get("variant")}
    baselines = {r["variant"]: r.get("baseline") or "" for r in records if r.get("variant")}
    groups = _by_variant(records)
    # per variant: the teacher of its cells, and (True) the teachers of its FADRM+ cells
    teachers = {(v, plus): _teacher_identity(groups.get(v, []), plus) for v in {"", *overrides} for plus in (False, True)}

    def changed(variant: str, method: str) -> str:
        """What a variant's cells of one method changed: its overrides, and its teacher(s) where they are not
        its baseline's (a FADRM+ row compares all of its teachers)."""
        ov = overrides[variant]
        what = [f"`{' '.join(ov)}`"] if ov else []
        plus = method == "fadrm+"
        mine, base = teachers[variant, plus], teachers.get((baselines[variant], plus), (frozenset(), {}))
        if mine[1] and base[1] and not _same_teacher(mine, base):
            word = "teachers" if len(mine[1]) > 1 else "teacher"
            what.append(f"{word} " + ", ".join(f"{arch} {100 * top1:.2f}%" for arch, top1 in sorted(mine[1].items())))
        return "; ".join(what) or "none"

    keys = sorted(k for k in acc if k[0])
    if not keys:
        return []
    lines = [
        "## Variants (one setting or the teacher changed, same protocol)",
        "",
        "`python benchmarks/grid.py run --variant NAME -S KEY=VALUE ...`: the plain cell's set made again with the "
        "overrides; the change is paired, seed by seed, against the plain cell (mean ± std of the differences), "
        "or against another variant's cells where it names one (`--baseline`). A variant made with another "
        "teacher (`--teacher ARCH=FILE`) names it and its top-1 in the last column.",
        "",
        "| variant | IPC | method | student | labels | top-1 (%) | against | its top-1, same seeds (%) | change (points) "
        "| what changed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        variant, ipc, method, student, labels = key
        base = baselines.get(variant, "")
        mine, plain = acc[key], acc.get((base, ipc, method, student, labels), {})
        common = sorted(mine.keys() & plain.keys())
        diffs = paired(mine, plain)
        change = "-"
        if diffs:
            mean, std, n = _stats(diffs)
            change = f"{100 * mean:+.2f} ± {100 * std:.2f} (n={n})"
        lines.append(
            f"| {variant} | {ipc} | {method} | {STUDENT_NAMES.get(student, student)} | {labels} | "
            f"{_cell(list(mine.values()))} | {base or 'plain'} | {_cell([plain[s] for s in common])} | {change} "
            f"| {changed(variant, method)} |"
        )
    return [*lines, ""]


def _shown(path: Path) -> str:
    """A path as the docs show it: relative to the repository where it lies inside it."""
    path = Path(path).resolve()
    root = Path(__file__).resolve().parents[1]
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def render(records_path: Path, md_path: Path, teachers: dict[str, dict]) -> Path:
    records = json.loads(Path(records_path).read_text()) if Path(records_path).is_file() else []
    # the runs' own teacher figures first: docs from the JSON alone
    full_data = {**teachers, **_full_data(records)}
    teachers = {**teachers, **_teachers_of([r for r in records if not r.get("variant")])}
    rows = summarise(records, full_data)
    students = [s for s in STUDENT_NAMES if any(k[2] == s for k in rows)]
    machines: dict[tuple, set] = {}  # (ipc, method) -> the devices its plain cells ran on
    for r in records:
        if not r.get("variant"):
            machines.setdefault((r["ipc"], r["method"]), set()).add(r.get("device", "?"))
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python benchmarks/grid.py` (records: `{_shown(records_path)}`, one per set, "
        "student and label kind). Full CIFAR-10 (50k train / 10k test JPEGs), the `cifar10-cpu` preset's "
        "protocol for every method: same teachers, same recovery budget (1,000 iterations), same views and "
        "soft labels, 300 student epochs. Student top-1 on the real test split after the last epoch, "
        "mean ± std over seeds (n seeds).",
        "",
    ]
    if teachers:
        lines += [
            "Teachers (full training split, hard labels with smoothing 0.1, `fadrm squeeze`): "
            + ", ".join(_teacher_figure(a, t) for a, t in teachers.items())
            + ".",
            "",
        ]
    references = [f"{ARCH_NAMES[a]} {100 * t['top1']:.2f}%" for a, t in full_data.items() if a in STUDENT_NAMES]
    if references and any(r["labels"] == "hard" for r in records):  # HLR needs hard-label cells
        lines += [
            "Full-data accuracy for hard-label recovery (HLR): the best teacher of the student's architecture "
            "trained here on the whole training split, " + ", ".join(references) + ".",
            "",
        ]
    figure = plot_accuracy(records, Path(records_path).with_suffix(".png"))
    if figure is not None:
        link = os.path.relpath(figure, Path(md_path).parent)
        lines += [f"![Top-1 by IPC and method, and each method minus random real images of the same seed]({link})", ""]
    for ipc in sorted({k[0] for k in rows}):
        lines += [
            f"## IPC {ipc}",
            "",
            "| method | "
            + " | ".join(f"{STUDENT_NAMES[s]} soft | {STUDENT_NAMES[s]} hard" for s in students)
            + " | paper (ResNet-18) | measured on |",
            "|---|" + "---|---|" * len(students) + "---|---|",
        ]
        for method in METHODS:
            if not any((ipc, method, s) in rows for s in students):
                continue
            cells = []
            for s in students:
                row = rows.get((ipc, method, s), {})
                cells += [_cell(row.get("soft", [])), _cell(row.get("hard", []))]
            paper = PAPER.get(method, {}).get(ipc)
            machine = ", ".join(sorted(machines.get((ipc, method), {"?"})))
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {paper if paper is not None else '-'} | {machine} |")
        lines += [
            "",
            f"DD-Ranking scores at IPC {ipc} (points; LRS in %):",
            "",
            "| method | " + " | ".join(f"{STUDENT_NAMES[s]} IOR | HLR | LRS" for s in students) + " |",
            "|---|" + "---|---|---|" * len(students),
        ]
        for method in METHODS:
            if not any((ipc, method, s) in rows for s in students):
                continue
            cells = []
            for s in students:
                row = rows.get((ipc, method, s), {})
                cells += [
                    f"{100 * row['ior']:+.2f}" if "ior" in row else "-",
                    f"{100 * row['hlr']:.2f}" if "hlr" in row else "-",
                    f"{100 * row['lrs']:.2f}" if "lrs" in row else "-",
                ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += variant_rows(records)
    notes = Path(records_path).with_suffix(".notes.md")  # what the figures say, written by hand beside the records
    if notes.is_file():
        lines += ["## Reading", "", notes.read_text().strip(), ""]
    lines += _provenance(records)
    md_path.write_text("\n".join(lines) + "\n")
    return md_path


def _short(code: str) -> str:
    commit, plus, changes = code.partition("+")
    return commit[:12] + plus + changes


def _provenance(records: list[dict]) -> list[str]:
    if not records:
        return ["No records yet: run `python benchmarks/grid.py run`."]
    devices = sorted({r.get("device", "?") for r in records} | {r.get("set_device", "?") for r in records})
    commands = sorted({r.get("command", "?") for r in records})
    torch_versions = sorted({r.get("torch", "?") for r in records})
    codes = sorted({_short(c) for r in records for c in (r.get("code"), r.get("set_code")) if c})
    unnamed = sum(not r.get("code") for r in records)
    evaluate_hours = sum(r.get("evaluate_seconds", 0) for r in records) / 3600
    sets = {(r.get("variant"), r["method"], r["ipc"], r["seed"]): r.get("set_seconds", 0) for r in records}
    set_hours = sum(sets.values()) / 3600
    return [
        "## How these were made",
        "",
        f"- {len(records)} evaluations of {len(sets)} sets; making the sets (select, recover, relabel) took "
        f"{set_hours:.1f} h and student training and testing {evaluate_hours:.1f} h, summed over processes "
        "(several run at once on one machine: `--workers`).",
        "- Machines: " + "; ".join(devices) + ". torch " + ", ".join(torch_versions) + ".",
        *(
            [
                "- Code (the commit each set and student ran from; `+changes`: the code differed from it): "
                + ", ".join(codes)
                + (f"; {unnamed} records made before the field existed name none" if unnamed else "")
                + "."
            ]
            if codes
            else []
        ),
        "- Commands:",
        *(f"  - `{c}`" for c in commands),
        "- The paper column is not this protocol: published ResNet-18 students of ResNet-18 teachers "
        "(about 95% on CIFAR-10) on GPUs, from the PSM paper's CIFAR-10 table (FADRM.md); ours are "
        "small teachers (ConvNet-64 at 78.6-82%) and 300 student epochs.",
        "",
    ]
