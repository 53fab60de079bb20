import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from street2shop.data.folders import LabelledSet, read_class_folders
from street2shop.data.records import Record
from street2shop.errors import ConfigError, DataError

COIL = Path("/work/shared/data/coil100/images")


def image(path: Path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (3, 3), (10, 20, 30)).save(path, format=fmt)


@pytest.fixture
def tree(tmp_path):
    """zebra: 2 images; apple: 3 (one .JPG); mango: 1 .bmp + non-images; empty: nothing; .hidden: 1 image."""
    image(tmp_path / "zebra" / "b.png")
    image(tmp_path / "zebra" / "a.png")
    image(tmp_path / "apple" / "3.jpg", "JPEG")
    image(tmp_path / "apple" / "1.JPG", "JPEG")
    image(tmp_path / "apple" / "2.gif", "GIF")
    image(tmp_path / "apple" / ".4.png")  # hidden file
    image(tmp_path / "mango" / "m.bmp", "BMP")
    (tmp_path / "mango" / "notes.txt").write_text("not an image")
    (tmp_path / "mango" / "Thumbs.db").write_bytes(b"\0")
    image(tmp_path / "mango" / "nested" / "deep.png")  # only files directly in the class folder count
    (tmp_path / "empty").mkdir()
    image(tmp_path / ".hidden" / "x.png")
    (tmp_path / "README.txt").write_text("a file at the top is not a class")
    return tmp_path


def rel(root: Path, record: Record) -> str:
    return Path(record.image_path).relative_to(root).as_posix()


def test_reads_classes_sorted_and_skips_what_is_not_an_image(tree, caplog):
    with caplog.at_level(logging.INFO, logger="street2shop.data.folders"):
        ls = read_class_folders(tree)
    assert isinstance(ls, LabelledSet)
    assert ls.classes == ["apple", "mango", "zebra"]
    assert [rel(tree, r) for r in ls] == ["apple/1.JPG", "apple/2.gif", "apple/3.jpg", "mango/m.bmp", "zebra/a.png", "zebra/b.png"]
    assert ls.labels().tolist() == [0, 0, 0, 1, 2, 2]
    assert ls.labels().dtype == np.int32
    assert len(ls) == 6
    assert "empty" in caplog.text  # the empty class folder is logged
    assert "6 images in 3 classes" in caplog.text


def test_records_are_labelled_shop_images_of_the_split(tree):
    ls = read_class_folders(tree, split="imagenet")
    r = ls.records[0]
    assert (r.product_id, r.domain, r.split, r.category, r.box) == ("apple", "shop", "imagenet", None, None)
    assert all(Path(r.image_path).is_absolute() and Path(r.image_path).is_file() for r in ls)
    assert [r.product_id for r in ls] == [ls.classes[i] for i in ls.labels()]


def test_extensions_can_be_chosen(tree):
    ls = read_class_folders(tree, extensions=("png", ".BMP"))
    assert ls.classes == ["mango", "zebra"]  # apple has no png left once its hidden one is skipped
    assert [rel(tree, r) for r in ls] == ["mango/m.bmp", "zebra/a.png", "zebra/b.png"]


def test_same_order_whatever_the_order_of_creation(tmp_path):
    for i, name in enumerate(["c", "a", "b"]):
        for f in ["9.png", "10.png", "1.png"][: i + 1]:
            image(tmp_path / name / f)
    ls = read_class_folders(tmp_path)
    assert ls.classes == ["a", "b", "c"]
    # plain string order, as for the class names
    assert [rel(tmp_path, r) for r in ls] == ["a/10.png", "a/9.png", "b/1.png", "b/10.png", "b/9.png", "c/9.png"]


def test_max_per_class_keeps_a_seeded_sorted_subset(tmp_path):
    for c in ("a", "b"):
        for i in range(10):
            image(tmp_path / c / f"{i}.png")
    image(tmp_path / "c" / "only.png")
    one = read_class_folders(tmp_path, max_per_class=3, seed=1)
    again = read_class_folders(tmp_path, max_per_class=3, seed=1)
    other = [read_class_folders(tmp_path, max_per_class=3, seed=s) for s in range(2, 6)]
    assert Counter(r.product_id for r in one) == {"a": 3, "b": 3, "c": 1}
    assert one.records == again.records
    assert any(o.records != one.records for o in other)
    for c in ("a", "b"):
        names = [Path(r.image_path).name for r in one if r.product_id == c]
        assert names == sorted(names) and len(set(names)) == 3
    assert one.labels().tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert len(read_class_folders(tmp_path, max_per_class=100)) == 21


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True])
def test_max_per_class_must_be_a_positive_integer(tree, bad):
    with pytest.raises(ConfigError, match="max_per_class"):
        read_class_folders(tree, max_per_class=bad)


def test_not_a_folder_or_no_class_folders_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        read_class_folders(tmp_path / "absent")
    with pytest.raises(DataError, match="no class folders"):
        read_class_folders(tmp_path)
    image(tmp_path / "loose.png")
    (tmp_path / ".git").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        read_class_folders(tmp_path)


def test_class_folders_without_images_is_a_data_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("")
    with pytest.raises(DataError, match="2 folders, none with an image"):
        read_class_folders(tmp_path)


def test_labels_of_a_hand_built_set():
    recs = [Record(f"/x/{c}{i}.png", c, "shop", "aux") for c, i in [("b", 0), ("a", 0), ("b", 1), ("c", 0)]]
    assert LabelledSet(recs, ["a", "b", "c"]).labels().tolist() == [1, 0, 1, 2]
    with pytest.raises(DataError, match="'c'"):
        LabelledSet(recs, ["a", "b"]).labels()


@pytest.mark.skipif(not COIL.exists(), reason="COIL-100 not present")
def test_coil100_reads_as_it_is():
    ls = read_class_folders(COIL)
    assert len(ls.classes) == 99
    assert len(ls) == 2366
    assert ls.classes == sorted(p.name for p in COIL.iterdir() if p.is_dir())
    counts = np.bincount(ls.labels(), minlength=99)
    assert counts.min() >= 1 and counts.sum() == 2366
    assert len(read_class_folders(COIL, max_per_class=4)) == 99 * 4
