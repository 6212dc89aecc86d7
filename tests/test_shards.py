"""Shards: the same images however the work is split, every shard idempotent, the CLI's --shard."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from typer.testing import CliRunner

from fadrm.cli import app
from fadrm.distilled import load_set
from fadrm.errors import ConfigError, MissingInputError
from fadrm.shards import Shard
from fadrm.stage import Layout
from fadrm.stages.recover import recover, recover_shard
from fadrm.stages.select import select, select_shard

from .conftest import tiny_config


def digest(folder) -> str:
    images, labels, _ = load_set(folder)
    return hashlib.sha256(images.numpy().tobytes() + labels.tobytes()).hexdigest()


def test_shard_spec():
    assert Shard.parse("1/4") == Shard(1, 4) and Shard(1, 4).units(10) == [1, 5, 9]
    assert sorted(u for i in range(3) for u in Shard(i, 3).units(8)) == list(range(8))
    for bad in ("4/4", "1", "a/2", "-1/2", "0/0"):
        with pytest.raises(ConfigError, match="shard"):
            Shard.parse(bad)


def test_one_or_four_shards_give_the_same_bytes(tiny_copy):
    cfg = tiny_config(tiny_copy.out_dir, "recover.batch_size=5")  # 20 images: 4 batches
    layout = Layout.of(cfg)
    select(cfg)
    one = recover(cfg)
    assert one["batches"] == 4 and one["recovered_images"] == 20
    whole = digest(layout.stage("recover"))
    shutil.rmtree(layout.stage("recover"))
    for i in (3, 1, 0, 2):  # any order, as independent workers finish
        done = recover_shard(cfg, Shard(i, 4))
        assert done["batches"] == 1 and done["recovered_images"] == 5
    assert not layout.stage("recover").exists()  # a shard publishes nothing
    assembled = recover(cfg)
    assert assembled["recovered_images"] == 0  # every batch came from the shards
    # each batch's time is kept with it and reported by the assembly, in batch order
    assert len(one["batch_seconds"]) == len(assembled["batch_seconds"]) == 4
    assert all(s > 0 for s in assembled["batch_seconds"])
    assert sum(assembled["batch_seconds"]) == pytest.approx(assembled["resumed_seconds"], abs=0.01)
    assert digest(layout.stage("recover")) == whole
    assert not layout.partial("recover").exists()


def test_a_shard_is_idempotent_and_a_cut_off_one_is_redone(tiny_copy):
    cfg = tiny_config(tiny_copy.out_dir, "recover.batch_size=10")
    layout = Layout.of(cfg)
    assert recover_shard(cfg, Shard(0, 2))["recovered_images"] == 10
    assert recover_shard(cfg, Shard(0, 2))["recovered_images"] == 0  # complete and matching: skipped
    (folder,) = layout.partial("recover").iterdir()
    (folder / "batch-00000.pt").rename(folder / "batch-00000.tmp")  # as if killed while writing
    assert recover_shard(cfg, Shard(0, 2))["recovered_images"] == 10
    with pytest.raises(MissingInputError, match=r"batches \[1\] are not recovered"):
        from fadrm.stages.recover import Recovery  # noqa: F401  (the assembly refuses a half set)
        from fadrm.tracker import NULL_TRACKER

        plan = _plan(cfg)
        plan.assemble(NULL_TRACKER)


def _plan(cfg):
    import torch

    from fadrm.data.prepared import Prepared
    from fadrm.stages.recover import Recovery

    layout = Layout.of(cfg)
    init, labels, _ = load_set(layout.stage("select"))
    return Recovery(cfg, layout, torch.device("cpu"), Prepared(layout.stage("prepare")), init, labels)


def test_select_by_class_shards_gives_the_same_set(tiny_copy):
    cfg = tiny_config(tiny_copy.out_dir)
    layout = Layout.of(cfg)
    select(cfg)
    whole = digest(layout.stage("select"))
    shutil.rmtree(layout.stage("select"))
    for i in range(3):
        assert select_shard(cfg, Shard(i, 3))["classes"] == len(Shard(i, 3).units(10))
    select(cfg)
    assert digest(layout.stage("select")) == whole


def test_cli_shard_option(tiny_copy, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = ["--preset", "tiny", "--no-track", "-S", f"out_dir={tiny_copy.out_dir}", "-S", "recover.batch_size=10"]
    runner = CliRunner()
    for i in range(2):
        result = runner.invoke(app, ["recover", *args, "--shard", f"{i}/2"])
        assert result.exit_code == 0, result.output
        assert f"shard={i}/2" in result.output and "recovered_images=10" in result.output
    result = runner.invoke(app, ["recover", *args])
    assert result.exit_code == 0 and "recovered_images=0" in result.output
    bad = runner.invoke(app, ["recover", *args, "--shard", "2/2"])
    assert bad.exit_code == 2 and "shard 2/2 does not exist" in bad.output
