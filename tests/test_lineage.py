"""Lineage that never lies: a stage is skipped only when the params it reads, the code it runs,
the content of the files it reads and its own output are all unchanged — and the same table
writes dvc.yaml's deps and params, so `dvc repro` and `fadrm run` agree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from fadrm.codedeps import code_files, dvc_drift, dvc_lists, rewrite_dvc_yaml
from fadrm.config import OPERATIONAL_PARAMS, STAGE_PARAMS, Config
from fadrm.errors import DamagedInputError
from fadrm.io import HashCache, sha256_file
from fadrm.stage import STAGE_ORDER, Layout, is_current, stale_reason
from fadrm.stages.evaluate import evaluate
from fadrm.tracker import flatten

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_stage_refuses_a_damaged_input_with_a_clear_message(tiny_copy):
    (Layout.of(tiny_copy).stage("recover") / "images" / "0001" / "001.png").unlink()
    with pytest.raises(
        DamagedInputError,
        match=r"'evaluate' needs the output of 'recover' .* which is damaged "
        r"\(1 file\(s\) missing, e.g. images/0001/001.png\); rerun `fadrm recover`",
    ):
        evaluate(tiny_copy)


def test_params_no_output_depends_on_rerun_nothing(tiny_copy):
    changed = tiny_config(tiny_copy.out_dir, "data.workers=2", "tracking.log_every=3", "device=cpu")
    assert [s for s in STAGE_ORDER if not is_current(s, changed)] == []
    other = tiny_config(tiny_copy.out_dir, "data.test_per_class=40")
    assert stale_reason("prepare", other) == "params changed: data.test_per_class (50 -> 40)"


def test_every_config_key_is_read_by_a_stage_or_declared_operational():
    keys = set(flatten(Config().to_dict()))
    covered = {
        k
        for k in keys
        for table in (*STAGE_PARAMS.values(), OPERATIONAL_PARAMS)
        for prefix in table
        if k == prefix or k.startswith(prefix + ".")
    }
    assert sorted(keys - covered) == []
    read = {p for params in STAGE_PARAMS.values() for p in params}
    assert not read & set(OPERATIONAL_PARAMS)


def test_each_stage_runs_the_modules_it_imports_and_no_others():
    for stage in STAGE_ORDER:
        files = code_files(stage)
        assert f"fadrm/stages/{stage}.py" in files
        assert {"fadrm/config.py", "fadrm/device.py", "fadrm/stage.py", "fadrm/io.py"} <= set(files)
        assert not [f for f in files if f.startswith(("fadrm/cli/", "flows/")) or f == "fadrm/tracking.py"]
    assert "fadrm/losses.py" in code_files("recover") and "fadrm/losses.py" not in code_files("squeeze")
    assert "fadrm/data/sources.py" in code_files("prepare") and "fadrm/data/sources.py" not in code_files("evaluate")


def test_dvc_yaml_deps_and_params_are_generated_from_the_stages():
    text = (ROOT / "dvc.yaml").read_text()
    assert dvc_drift(text) == [], "run `fadrm dvc-yaml --write`"
    spec = yaml.safe_load(text)["stages"]
    for name, lists in dvc_lists().items():
        assert spec[name]["deps"] == lists["deps"] and spec[name]["params"] == lists["params"]
    # a module a stage imports but dvc.yaml omits is found, and the writer puts it back, touching nothing else
    broken = text.replace("      - fadrm/io.py\n", "", 1)
    assert "prepare.deps: missing fadrm/io.py" in dvc_drift(broken)
    assert rewrite_dvc_yaml(broken, dvc_lists()) == text


def test_hash_cache_rehashes_when_size_or_timestamps_move(tmp_path, monkeypatch):
    from fadrm import io as fio

    calls = []
    real = fio.sha256_file
    monkeypatch.setattr(fio, "sha256_file", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    monkeypatch.setattr(fio, "RACY_SECONDS", 0.0)
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    old = os.stat(path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns - 10**10))  # settled: 10 s old
    cache = HashCache(tmp_path / "cache.sqlite")
    first = cache.sha256(path)
    assert cache.sha256(path) == first and calls == ["a.bin"]  # the second answer came from the cache
    st = path.stat()
    path.write_bytes(b"y" * 100)  # same size ...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... same mtime: the ctime still moved
    assert cache.sha256(path) == sha256_file(path) != first
    cache.close()
    reopened = HashCache(tmp_path / "cache.sqlite")
    assert reopened.sha256(path) == sha256_file(path)


def test_an_entry_taken_in_the_clock_tick_of_a_write_is_not_trusted(tmp_path, monkeypatch):
    """A file written twice within one tick of a coarse file-system clock keeps size and timestamps:
    the hash taken between the writes must not be trusted (git's "racy" entries)."""
    from fadrm import io as fio

    path = tmp_path / "b.bin"
    path.write_bytes(b"1" * 10)
    cache = HashCache(tmp_path / "cache.sqlite")
    cache.remember(path, "0" * 64)  # what a hash taken just before a same-tick rewrite would hold
    assert cache.sha256(path) == sha256_file(path)  # racy: hashed again
    monkeypatch.setattr(fio, "RACY_SECONDS", -60.0)  # were the entry 60 s older than the file's change ...
    cache.remember(path, "0" * 64)
    assert cache.sha256(path) == "0" * 64  # ... it would be trusted, as size and timestamps match
