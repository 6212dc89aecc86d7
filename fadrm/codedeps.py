"""Which source files each stage runs, and the ``deps:``/``params:`` of dvc.yaml made from them.

A stage's code is the import closure of its module inside the package, read from the source
(``import`` statements anywhere in a module, including those inside functions), so editing
the CLI or a Prefect flow never makes a teacher stale, while editing ``fadrm/io.py`` — which
every stage runs — does. The same closure gives dvc.yaml its code ``deps:`` and the same
per-stage table of param keys (``fadrm.config.STAGE_PARAMS``) gives its ``params:``, so
``dvc repro`` and ``fadrm run`` agree about what is stale::

    fadrm dvc-yaml            # exit 1 and the differences when dvc.yaml has drifted
    fadrm dvc-yaml --write    # rewrite only the deps/params lists (comments, outs, plots stay)
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from pathlib import Path

PACKAGE = "fadrm"
PACKAGE_DIR = Path(__file__).resolve().parent

# Data files (not Python) a stage reads from the package, as DVC deps.
DATA_DEPS: dict[str, tuple[str, ...]] = {"prepare": ("fadrm/assets",)}


def _module_file(module: str) -> Path | None:
    """``fadrm.data.prepared`` -> its file (a package's ``__init__.py``), None if not in the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(module: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _imports(path: Path, module: str) -> set[str]:
    """Package modules that ``path`` (module ``module``) imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from fadrm import distributed` imports a module, `from fadrm import __version__` a name
            found.update(f"{target}.{alias.name}" for alias in node.names if _module_file(f"{target}.{alias.name}"))
    return {m for name in found for m in _with_parents(name) if _module_file(m) is not None}


@functools.cache
def code_files(stage: str) -> tuple[str, ...]:
    """The package files that ``fadrm.stages.<stage>`` runs, as sorted paths like ``fadrm/io.py``."""
    start = f"{PACKAGE}.stages.{stage}"
    if _module_file(start) is None:
        raise ValueError(f"no stage module {start}")
    seen: set[str] = set()
    todo = _with_parents(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(_imports(_module_file(module), module) - seen)
    root = PACKAGE_DIR.parent
    return tuple(sorted(_module_file(m).relative_to(root).as_posix() for m in seen))


@functools.cache
def code_hashes(stage: str) -> dict[str, str]:
    """sha256 of every file in the stage's code, by path (what its fingerprint records)."""
    root = PACKAGE_DIR.parent
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in code_files(stage)}


# ----------------------------------------------------------------------------- dvc.yaml


def dvc_lists() -> dict[str, dict[str, list[str]]]:
    """The ``deps:`` and ``params:`` list of every dvc.yaml stage, from the one source of truth:
    the stage graph (``fadrm.layout``), the params table (``fadrm.config``) and the code closure."""
    from fadrm.config import STAGE_PARAMS
    from fadrm.layout import STAGE_INPUTS

    return {
        stage: {
            "deps": [f"${{out_dir}}/{name}" for name in inputs] + list(DATA_DEPS.get(stage, ())) + list(code_files(stage)),
            "params": list(STAGE_PARAMS[stage]),
        }
        for stage, inputs in STAGE_INPUTS.items()
    }


def dvc_drift(text: str) -> list[str]:
    """How the dvc.yaml ``text`` differs from :func:`dvc_lists` (empty: in sync)."""
    written, wanted = read_dvc_lists(text), dvc_lists()
    problems = []
    for stage, lists in wanted.items():
        if stage not in written:
            problems.append(f"stage '{stage}' is missing")
            continue
        for key, items in lists.items():
            have = written[stage][key]
            for item in items:
                if item not in have:
                    problems.append(f"{stage}.{key}: missing {item}")
            for item in have:
                if item not in items:
                    problems.append(f"{stage}.{key}: not read by the stage: {item}")
            if not problems and have != items:
                problems.append(f"{stage}.{key}: out of order")
    return problems


_STAGE = re.compile(r"^  (\w+):\s*$")
_KEY = re.compile(r"^    (\w+):\s*$")
_ITEM = re.compile(r"^      - (.+?)\s*$")


def rewrite_dvc_yaml(text: str, wanted: dict[str, dict[str, list[str]]]) -> str:
    """``text`` with the ``deps:``/``params:`` lists of each stage in ``wanted`` replaced.

    A line-based edit rather than a YAML round trip, so comments, order and the ``outs``,
    ``metrics`` and ``plots`` entries are kept exactly as written.
    """
    lines = text.splitlines()
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if (m := _STAGE.match(line)) is not None:
            stage = m.group(1)
        key = _KEY.match(line)
        if stage in wanted and key is not None and key.group(1) in wanted[stage]:
            out.append(line)
            i += 1
            while i < len(lines) and _ITEM.match(lines[i]):
                i += 1
            out += [f"      - {item}" for item in wanted[stage][key.group(1)]]
            continue
        out.append(line)
        i += 1
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def read_dvc_lists(text: str) -> dict[str, dict[str, list[str]]]:
    """The ``deps:``/``params:`` lists as written in dvc.yaml (plain strings only)."""
    import yaml

    stages = (yaml.safe_load(text) or {}).get("stages", {})
    return {
        name: {key: [item for item in spec.get(key, []) if isinstance(item, str)] for key in ("deps", "params")}
        for name, spec in stages.items()
    }
