import csv
import io
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fadrm.data.prepared import Prepared
from fadrm.data.sources import ArchiveTree, check_member, safe_extract, scan, scan_tree, tree_root
from fadrm.errors import DataError, UnsafeArchiveError
from fadrm.stage import Layout
from fadrm.stages.prepare import prepare

from .conftest import make_tree, tiny_config


def _prepare(tmp_path, *overrides):
    cfg = tiny_config(tmp_path / "out", *overrides)
    metrics = prepare(cfg)
    return Prepared(Layout.of(cfg).stage("prepare")), metrics


def test_builtin_subset_is_real_cifar10(tmp_path):
    data, metrics = _prepare(tmp_path, "data.train_per_class=null", "data.test_per_class=null")
    assert data.classes[:3] == ["airplane", "automobile", "bird"] and data.num_classes == 10
    assert metrics["train_images"] == 5000 and metrics["test_images"] == 1000
    train = data.split("train")
    assert train.images.shape == (5000, 32, 32, 3) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [500] * 10
    assert data.manifest["counts"]["test"]["cat"] == 100
    # every source file is listed with its content hash
    with open(data.dir / "files.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len(rows) == 6000 and all(len(r["sha256"]) == 64 for r in rows)
    assert len(data.digest) == 64


def test_prepare_is_deterministic_and_subsets(tmp_path):
    a, _ = _prepare(tmp_path / "a")
    b, _ = _prepare(tmp_path / "b")
    assert a.digest == b.digest
    assert len(a.split("train")) == 1000 and len(a.split("test")) == 500
    assert np.array_equal(a.split("train").images, b.split("train").images)


def test_imagefolder_with_val_split(builtin_tree, tmp_path):
    root = make_tree(builtin_tree, tmp_path / "folder", ["cat", "dog"], 6, 3, test_name="val")
    data, metrics = _prepare(
        tmp_path,
        "data.source=imagefolder",
        f"data.path={root}",
        "data.name=pets",
        "data.resolution=32",
        "data.train_per_class=null",
        "data.test_per_class=null",
    )
    assert data.classes == ["cat", "dog"]
    assert metrics["train_images"] == 12 and metrics["test_images"] == 6
    assert data.manifest["test_folder"] == "val"
    # an unknown dataset gets its normalisation measured on the training split
    assert data.manifest["mean"] != [0.4914, 0.4822, 0.4465]


def test_file_backed_large_images(builtin_tree, tmp_path):
    root = make_tree(builtin_tree, tmp_path / "folder", ["cat", "dog"], 4, 2)
    data, _ = _prepare(
        tmp_path,
        "data.source=imagefolder",
        f"data.path={root}",
        "data.name=pets",
        "data.resolution=96",
        "data.train_per_class=null",
        "data.test_per_class=null",
    )
    assert not data.cached
    batch = data.split("train").load([0, 1], 96)
    assert batch.shape == (2, 3, 96, 96)
    x, y = next(data.test_batches(4, "cpu"))
    assert x.shape == (4, 3, 96, 96) and y.tolist() == [0, 0, 1, 1]


def _tar(tmp_path, root, name="data.tar.gz"):
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="mydata")
    return archive


def test_an_archive_is_listed_from_its_names_as_its_extracted_folder_would_be(tiny_tree, tmp_path):
    """prepare lists an archive without extracting it: the same classes, files and order as a scan of the
    extracted folder (nested folders, hidden files and folders, files that are not images), so the
    dataset's hash does not depend on which of the two read it."""
    extra = tiny_tree / "train" / "cat"
    (extra / "b-nested" / ".hidden").mkdir(parents=True)
    shutil.copy(next((tiny_tree / "train" / "ship").iterdir()), extra / "b-nested" / "0-first.jpg")
    shutil.copy(next((tiny_tree / "train" / "ship").iterdir()), extra / "b-nested" / ".hidden" / "skip.jpg")
    (extra / ".skip.jpg").write_bytes(b"")
    (extra / "notes.txt").write_text("not an image")
    (extra / "z-last.PNG").write_bytes(b"")
    archive = _tar(tmp_path, tiny_tree)
    with tarfile.open(archive) as tf:
        names = [m.name for m in tf.getmembers() if m.isfile()]
    tree = ArchiveTree(names, archive)
    listed = scan_tree(tree, tree_root(tree))
    on_disk = scan(tiny_tree)
    assert listed[0] == on_disk[0] == ["airplane", "cat", "ship"]
    for split in ("train", "test"):
        assert (listed[1][split].paths, listed[1][split].labels) == (on_disk[1][split].paths, on_disk[1][split].labels)
    cats = [p for p in on_disk[1]["train"].paths if p.startswith("train/cat/")]
    assert cats[-2:] == ["train/cat/z-last.PNG", "train/cat/b-nested/0-first.jpg"]  # os.walk: files, then folders


def test_only_the_files_a_subset_keeps_are_extracted(tiny_tree, tmp_path):
    archive = _tar(tmp_path, tiny_tree)
    dest = tmp_path / "dest"
    safe_extract(archive, dest, lambda names: [n for n in names if n.startswith("mydata/test/cat/")])
    written = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert written == sorted(f"mydata/test/cat/{p.name}" for p in (tiny_tree / "test" / "cat").iterdir())
    data, metrics = _prepare(tmp_path, "data.source=tar", f"data.path={archive}", "data.train_per_class=2", "data.test_per_class=1")
    assert metrics["train_images"] == 6 and metrics["test_images"] == 3
    full, _ = _prepare(
        tmp_path / "full", "data.source=imagefolder", f"data.path={tiny_tree}", "data.train_per_class=2", "data.test_per_class=1"
    )
    assert data.digest == full.digest  # the same files, read from the archive or from the folder
    # file-backed, at a measured resolution: the subset is read first, and the copy kept serves any other subset
    for overrides, where in (((), "measured"), (("data.resolution=32",), "known")):
        kept, _ = _prepare(
            tmp_path / where, "data.source=tar", f"data.path={archive}", "data.cache=off", "data.train_per_class=2", *overrides
        )
        assert not kept.cached and kept.digest != data.digest  # all 4 test images per class this time
        root = kept.dir / kept.manifest["root"]
        assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg")) == sorted(
            p.relative_to(tiny_tree).as_posix() for p in tiny_tree.rglob("*.jpg")
        )


def test_tar_archive(tiny_tree, tmp_path):
    archive = _tar(tmp_path, tiny_tree)
    data, metrics = _prepare(
        tmp_path,
        "data.source=tar",
        f"data.path={archive}",
        "data.name=tiny",
        "data.resolution=32",
        "data.train_per_class=null",
        "data.test_per_class=null",
    )
    assert data.classes == ["airplane", "cat", "ship"] and metrics["train_images"] == 24


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/evil.jpg", "a/../../evil.jpg"])
def test_archive_member_escaping_is_refused(tmp_path, name):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo(name)
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_extract(archive, dest)
    assert not any(dest.iterdir()) and not (tmp_path / "evil.jpg").exists()


def test_archive_links_are_refused(tmp_path):
    info = tarfile.TarInfo("train/cat/link.jpg")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    with pytest.raises(UnsafeArchiveError, match="link"):
        check_member(info, tmp_path)


def test_escaping_member_through_the_stage(tmp_path):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("../outside.txt")
        tf.addfile(info, io.BytesIO(b""))
    cfg = tiny_config(tmp_path / "out", "data.source=tar", f"data.path={archive}")
    with pytest.raises(UnsafeArchiveError):
        prepare(cfg)
    assert not Layout.of(cfg).stage("prepare").exists()  # nothing half-written


def test_bad_datasets_are_named(tiny_tree, tmp_path):
    def run(root):
        return prepare(
            tiny_config(tmp_path / "out", "data.source=imagefolder", f"data.path={root}", "data.resolution=32", "data.name=tiny")
        )

    with pytest.raises(DataError, match="does not exist"):
        run(tmp_path / "absent")
    (tiny_tree / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=r"only in train: \['dog'\]"):
        run(tiny_tree)
    (tiny_tree / "test" / "dog").mkdir()
    with pytest.raises(DataError, match="class 'dog' has no images"):
        run(tiny_tree)
    (tiny_tree / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tiny_tree / "test" / "dog" / "ok.png").write_bytes(
        (tiny_tree / "train" / "cat").joinpath(sorted((tiny_tree / "train" / "cat").iterdir())[0].name).read_bytes()
    )
    with pytest.raises(DataError, match="unreadable image .*broken.jpg"):
        run(tiny_tree)
    assert not (tmp_path / "out" / "prepare").exists()


def test_missing_test_split(tiny_tree, tmp_path):
    (tiny_tree / "test").rename(tiny_tree / "holdout")
    with pytest.raises(DataError, match="no 'val/' or 'test/'"):
        prepare(tiny_config(tmp_path / "out", "data.source=imagefolder", f"data.path={tiny_tree}", "data.resolution=32"))


def _write_cifar_copy(root, builtin_tree):
    """A local copy in torchvision's CIFAR-10 layout, made of real images of the built-in subset."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    classes = sorted(p.name for p in (builtin_tree / "train").iterdir())
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        images, labels = [], []
        for label, name in enumerate(classes):
            for path in sorted((builtin_tree / split / name).iterdir())[:2]:
                images.append(np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1).reshape(-1))
                labels.append(label)
        for file in files:
            with open(folder / file, "wb") as fh:
                pickle.dump({"data": np.stack(images), "labels": labels}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": classes}, fh)


def test_torchvision_local_copy(builtin_tree, tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    root = tmp_path / "tv"
    _write_cifar_copy(root, builtin_tree)
    # Our copy has other bytes than the official archive; only the md5 comparison is bypassed.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: __import__("os").path.isfile(path))
    data, metrics = _prepare(tmp_path, "data.source=torchvision", f"data.path={root}", "data.name=cifar10")
    assert data.classes[0] == "airplane" and metrics["train_images"] == 100 and metrics["test_images"] == 20


def test_torchvision_missing_copy_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="data.download"):
        prepare(tiny_config(tmp_path / "out", "data.source=torchvision", f"data.path={tmp_path / 'none'}"))


@pytest.mark.full_data
def test_full_cifar10_archive_is_readable(shared_archive, tmp_path):
    data, metrics = _prepare(
        tmp_path, "data.source=tar", f"data.path={shared_archive}", "data.train_per_class=20", "data.test_per_class=10"
    )
    assert metrics["train_images"] == 200 and data.num_classes == 10


def test_a_cached_split_is_streamed_to_disk_and_read_as_a_memory_map(tmp_path):
    data, _ = _prepare(tmp_path)
    train = data.split("train")
    assert isinstance(train.images, np.memmap) and train.images.shape == (1000, 32, 32, 3)
    batch = train.load([3, 1], 32)  # a batch is an ordinary in-memory tensor of its rows
    assert batch.shape == (2, 3, 32, 32) and np.array_equal(batch[1].permute(1, 2, 0).numpy(), train.images[1])


def test_a_file_backed_archive_is_kept_once_outside_the_stage_output_and_comes_back(tiny_tree, tmp_path):
    """At 224 px the images stay files; the extracted tree lives in <out>/.cache/extracted (one
    copy per archive, not in the DVC-versioned stage folder) and is re-extracted when missing."""
    archive = _tar(tmp_path, tiny_tree)
    overrides = ("data.source=tar", f"data.path={archive}", "data.name=tiny", "data.resolution=96")
    data, _ = _prepare(tmp_path, *overrides, "data.train_per_class=null", "data.test_per_class=null")
    assert not data.cached and not (data.dir / "files").exists()
    assert data.manifest["root"].startswith("../.cache/extracted/")
    kept = (data.dir / data.manifest["extracted_from"]["into"]).resolve()
    assert kept.parent == (tmp_path / "out" / ".cache" / "extracted").resolve()
    first = data.split("train").load([0, 5], 96)
    shutil.rmtree(kept)  # e.g. a `dvc pull` of the stage outputs on another machine
    again = Prepared(data.dir).split("train").load([0, 5], 96)
    assert torch.equal(first, again) and (kept / ".complete").is_file()
    shutil.rmtree(kept)
    with tarfile.open(archive, "w:gz") as tf:  # not the archive it was prepared from
        tf.add(tiny_tree / "train", arcname="mydata/train")
    with pytest.raises(DataError, match="changed since the dataset was prepared"):
        Prepared(data.dir).split("train")


def test_an_image_folder_inside_the_project_is_stored_relative(builtin_tree, tmp_path, monkeypatch):
    project = tmp_path / "project"
    root = make_tree(builtin_tree, project / "images", ["cat", "dog"], 4, 2)
    monkeypatch.chdir(project)
    cfg = tiny_config(project / "out", "data.source=imagefolder", f"data.path={root}", "data.name=pets", "data.resolution=96")
    prepare(cfg)
    stage = Layout.of(cfg).stage("prepare")
    assert Prepared(stage).manifest["root"] == "../../images"
    moved = tmp_path / "elsewhere"
    project.rename(moved)  # a clone (or `dvc pull`) in another place
    monkeypatch.chdir(moved)
    batch = Prepared(moved / stage.relative_to(project)).split("train").load([0], 96)
    assert batch.shape == (1, 3, 96, 96)


def test_a_cache_that_cannot_fit_on_disk_is_refused_with_the_way_out(tiny_tree, tmp_path, monkeypatch):
    import fadrm.stages.prepare as stage

    monkeypatch.setattr(stage.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    overrides = ("data.source=imagefolder", f"data.path={tiny_tree}", "data.name=tiny", "data.resolution=224", "data.cache=on")
    with pytest.raises(DataError, match=r"0\.0 GB free; use data.cache: off"):
        _prepare(tmp_path, *overrides)
