"""When a stage's output may be trusted, and why not when it may not.

A stage output is *current* when everything that made it is unchanged and the output
itself is whole:

- the params it reads (``fadrm.config.STAGE_PARAMS``, per key),
- the code it runs (``fadrm.codedeps.code_files``: the modules its module imports),
- the content of the files it reads from outside the pipeline (the raw dataset, a teacher's
  weights file: a stage module's ``input_files(cfg)``), hashed through :class:`HashCache`,
- the content of the earlier outputs it reads (their manifests' digests), and they are current,
- its own files, which must match the manifest written with them (a deleted image, an
  emptied soft-label file or a stray file makes the output damaged, hence stale).

``stage.json`` records all of it; :meth:`Lineage.stale_reason` says in words what changed.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fadrm.codedeps import code_hashes
from fadrm.config import STAGE_PARAMS, Config, fingerprint
from fadrm.errors import DamagedInputError, FadrmError, MissingInputError
from fadrm.io import STAGE_RECORD, HashCache, read_json, tree_files
from fadrm.layout import STAGE_INPUTS, Layout
from fadrm.tracker import flatten

MAX_LISTED_SOURCES = 1000  # input files listed one by one in stage.json (beyond: only their digest)


def manifest_of(folder: Path, cache: HashCache) -> dict[str, list]:
    """``{relative path: [size, sha256]}`` of every file in a stage folder but its record."""
    return {rel: [(folder / rel).stat().st_size, cache.sha256(folder / rel)] for rel in tree_files(folder, skip=(STAGE_RECORD,))}


def manifest_digest(files: dict[str, list]) -> str:
    return fingerprint(files)


def input_files(name: str, cfg: Config) -> dict[str, Path]:
    """The files from outside the pipeline that stage ``name`` reads (its module's ``input_files``)."""
    module = importlib.import_module(f"fadrm.stages.{name}")
    listing: Callable[[Config], dict[str, Path]] | None = getattr(module, "input_files", None)
    return listing(cfg) if listing is not None else {}


class Lineage:
    """Fingerprints and staleness of the stages under one ``out_dir`` (one cache, one memo).

    The memo assumes nothing changes the folder while this object is used: make a new one
    after a stage has run (the pipeline does), or for every independent question.
    """

    def __init__(self, cfg: Config, layout: Layout | None = None, cache: HashCache | None = None):
        self.cfg = cfg
        self.layout = layout or Layout.of(cfg)
        self.cache = cache or HashCache(self.layout.hash_cache if self.layout.root.is_dir() else None)
        self._damage: dict[str, str | None] = {}
        self._stale: dict[str, str | None] = {}

    # -- outputs

    def record(self, name: str) -> dict[str, Any] | None:
        path = self.layout.stage(name) / STAGE_RECORD
        if not path.is_file():
            return None
        try:
            return read_json(path)
        except (OSError, ValueError):
            return {}

    def damage(self, name: str) -> str | None:
        """What is wrong with the output folder of ``name`` (None: whole, as recorded)."""
        if name not in self._damage:
            self._damage[name] = self._find_damage(name)
        return self._damage[name]

    def _find_damage(self, name: str) -> str | None:
        folder = self.layout.stage(name)
        record = self.record(name)
        if record is None:
            return "missing"
        files = record.get("files")
        if not isinstance(files, dict) or "digest" not in record:
            return f"{folder / STAGE_RECORD} has no file manifest (unreadable, or written by an older fadrm)"
        present = set(tree_files(folder, skip=(STAGE_RECORD,)))
        missing = sorted(set(files) - present)
        if missing:
            return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
        extra = sorted(present - set(files))
        if extra:
            return f"{len(extra)} file(s) not written by the stage, e.g. {extra[0]}"
        for rel, (size, digest) in sorted(files.items()):
            path = folder / rel
            if path.stat().st_size != size:
                return f"{rel} changed size ({size} -> {path.stat().st_size} bytes)"
            if self.cache.sha256(path) != digest:
                return f"{rel} changed content since the stage wrote it"
        return None

    def input_digests(self, name: str) -> dict[str, str]:
        """The manifest digests of the outputs ``name`` reads; a clear error if one is missing or damaged."""
        digests = {}
        for dep in STAGE_INPUTS[name]:
            problem = self.damage(dep)
            where = self.layout.stage(dep)
            if problem == "missing":
                raise MissingInputError(
                    f"'{name}' needs the output of '{dep}' in {where}, which is missing; "
                    f"run `fadrm {dep}` first (or `fadrm run` for the whole pipeline)"
                )
            if problem is not None:
                raise DamagedInputError(
                    f"'{name}' needs the output of '{dep}' in {where}, which is damaged ({problem}); "
                    f"rerun `fadrm {dep}` (or `fadrm run`, which redoes what is stale)"
                )
            digests[dep] = self.record(dep)["digest"]
        return digests

    # -- what a stage's output should have been made from

    def sources(self, name: str) -> dict[str, str]:
        """``{label: sha256}`` of the files from outside the pipeline that ``name`` reads."""
        return {label: self.cache.sha256(path) for label, path in sorted(input_files(name, self.cfg).items())}

    def expected(self, name: str, inputs: dict[str, str], sources: dict[str, str]) -> dict[str, Any]:
        """What the record of an output made now, from these inputs and sources, must say."""
        code = code_hashes(name)
        payload = {
            "stage": name,
            "params": self.cfg.values(STAGE_PARAMS[name]),
            "inputs": inputs,
            "sources": fingerprint(sources),
            "code": fingerprint(code),
        }
        listed = sources if len(sources) <= MAX_LISTED_SOURCES else {}
        return {**payload, "fingerprint": fingerprint(payload), "source_files": listed, "code_files": code}

    # -- staleness

    def stale_reason(self, name: str) -> str | None:
        """None when the output of ``name`` is current, else what changed, in words."""
        if name not in self._stale:
            self._stale[name] = self._find_stale(name)
        return self._stale[name]

    def _find_stale(self, name: str) -> str | None:
        problem = self.damage(name)
        if problem == "missing":
            return "no output yet"
        if problem is not None:
            return f"output damaged: {problem}"
        for dep in STAGE_INPUTS[name]:
            if self.stale_reason(dep) is not None:
                return f"its input '{dep}' is stale"
        try:
            inputs = self.input_digests(name)
            sources = self.sources(name)
        except (FadrmError, OSError) as exc:
            return f"cannot check its inputs: {exc}"
        want = self.expected(name, inputs, sources)
        record = self.record(name)
        if record.get("fingerprint") == want["fingerprint"]:
            return None
        return _difference(record, want)

    def is_current(self, name: str) -> bool:
        return self.stale_reason(name) is None


def _difference(record: dict[str, Any], want: dict[str, Any]) -> str:
    """The first kind of change between a stage's record and what it should be now."""
    old_params, new_params = flatten(record.get("params") or {}), flatten(want["params"])
    params = [k for k in sorted(set(old_params) | set(new_params)) if old_params.get(k) != new_params.get(k)]
    if params:
        key = params[0]
        more = f" and {len(params) - 1} more" if len(params) > 1 else ""
        return f"params changed: {key} ({_short(old_params.get(key))} -> {_short(new_params.get(key))}){more}"
    changed = [dep for dep, digest in want["inputs"].items() if record.get("inputs", {}).get(dep) != digest]
    if changed:
        return f"the output of '{changed[0]}' changed"
    if record.get("sources") != want["sources"]:
        old, new = record.get("source_files") or {}, want["source_files"]
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            return f"input files changed: {len(diff)}, e.g. {diff[0]}"
        return "input files changed"
    if record.get("code") != want["code"]:
        old, new = record.get("code_files") or {}, want["code_files"]
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"code changed: {', '.join(diff[:3]) or 'its modules'}"
    return "its record differs from what it would be now"


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
