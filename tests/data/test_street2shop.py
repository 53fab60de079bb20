import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from street2shop.data.image import Box
from street2shop.data.records import read_manifest_csv
from street2shop.data.street2shop import CATEGORIES, import_street2shop, read_street2shop
from street2shop.errors import DataError


def make_layout(root: Path, photos: dict[int, str], files: dict[str, object], photos_txt: bool = True) -> Path:
    """Builds root/photos/<9-digit id><ext> (tiny real images), photos.txt and meta/json/<name>.json.

    ``photos`` maps photo id -> extension; ``files`` maps a JSON file's stem
    to its content (an object to dump, or raw text).
    """
    (root / "photos").mkdir(parents=True)
    (root / "meta" / "json").mkdir(parents=True)
    for i, ext in photos.items():
        Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(root / "photos" / f"{i:09d}{ext}", format="PNG" if ext.lower() == ".png" else "JPEG")
    if photos_txt:
        ids = sorted(set(photos) | {e["photo"] for c in files.values() if isinstance(c, list) for e in c})
        lines = [f"{i:09d},http://example.com/{i}.jpg" for i in ids]
        (root / "photos" / "photos.txt").write_text("\n".join(lines) + "\n")
    for stem, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (root / "meta" / "json" / f"{stem}.json").write_text(text)
    return root


def bbox(left, top, width, height):
    return {"left": left, "top": top, "width": width, "height": height}


def name(record) -> str:
    return Path(record.image_path).name


def test_reads_train_test_and_retrieval_of_one_category(tmp_path):
    root = make_layout(
        tmp_path,
        {11849: ".jpg", 12000: ".jpg", 163478: ".jpg"},
        {
            "train_pairs_bags": [{"photo": 11849, "product": 76, "bbox": {"width": 33, "top": 385, "height": 82, "left": 381}}],
            "test_pairs_bags": [{"photo": 12000, "product": 76, "bbox": bbox(1, 2, 3, 4)}],
            "retrieval_bags": [{"photo": 163478, "product": 76}],
        },
    )
    rs = read_street2shop(root)
    got = [(name(r), r.product_id, r.domain, r.split, r.category, r.box, dict(r.metadata)) for r in rs]
    assert got == [
        ("000011849.jpg", "bags/76", "street", "train", "bags", Box(381, 385, 33, 82), {"photo_id": "11849"}),
        ("000012000.jpg", "bags/76", "street", "test", "bags", Box(1, 2, 3, 4), {"photo_id": "12000"}),
        ("000163478.jpg", "bags/76", "shop", "catalog", "bags", None, {"photo_id": "163478"}),
    ]
    assert all(Path(r.image_path).is_absolute() and Path(r.image_path).is_file() for r in rs)
    assert rs.missing == []


def test_product_ids_are_namespaced_by_category(tmp_path):
    # product 1 of bags and product 1 of hats are different products
    root = make_layout(
        tmp_path,
        {1: ".jpg", 2: ".jpg", 3: ".jpg", 4: ".jpg"},
        {
            "train_pairs_bags": [{"photo": 1, "product": 1, "bbox": bbox(0, 0, 2, 2)}],
            "retrieval_bags": [{"photo": 2, "product": 1}],
            "train_pairs_hats": [{"photo": 3, "product": 1, "bbox": bbox(0, 0, 2, 2)}],
            "retrieval_hats": [{"photo": 4, "product": 1}],
        },
    )
    rs = read_street2shop(root)
    assert rs.products() == ["bags/1", "hats/1"]
    assert {(name(r), r.product_id, r.category) for r in rs} == {
        ("000000001.jpg", "bags/1", "bags"), ("000000002.jpg", "bags/1", "bags"),
        ("000000003.jpg", "hats/1", "hats"), ("000000004.jpg", "hats/1", "hats"),
    }


def test_shop_photo_of_several_products_gives_one_record_per_product(tmp_path):
    root = make_layout(
        tmp_path,
        {500: ".jpg"},
        {"retrieval_tops": [{"photo": 500, "product": 1}, {"photo": 500, "product": 2}, {"photo": 500, "product": 1}]},
    )
    rs = read_street2shop(root)
    assert [(name(r), r.product_id) for r in rs] == [("000000500.jpg", "tops/1"), ("000000500.jpg", "tops/2")]


def test_several_boxes_give_one_record_each_and_exact_duplicates_go(tmp_path, caplog):
    root = make_layout(
        tmp_path,
        {7: ".jpg"},
        {
            "train_pairs_skirts": [
                {"photo": 7, "product": 3, "bbox": bbox(10, 10, 20, 20)},
                {"photo": 7, "product": 3, "bbox": bbox(50, 10, 20, 30)},
                {"photo": 7, "product": 3, "bbox": {"height": 20, "width": 20, "top": 10, "left": 10}},  # duplicate
            ]
        },
    )
    with caplog.at_level(logging.INFO, logger="street2shop.data.street2shop"):
        rs = read_street2shop(root)
    assert [r.box for r in rs] == [Box(10, 10, 20, 20), Box(50, 10, 20, 30)]
    assert "1 duplicates removed" in caplog.text


def test_bbox_key_order_does_not_matter(tmp_path):
    text = (
        '[{"photo": 1, "product": 1, "bbox": {"width": 33, "top": 385, "height": 82, "left": 381}},\n'
        ' {"bbox": {"left": 381, "height": 82, "top": 385, "width": 33}, "product": 2, "photo": 1},\n'
        ' {"product": 3, "bbox": {"top": 385, "left": 381, "width": 33, "height": 82}, "photo": 1}]'
    )
    root = make_layout(tmp_path, {1: ".jpg"}, {"test_pairs_belts": text})
    rs = read_street2shop(root)
    assert [(r.product_id, r.box) for r in rs] == [(f"belts/{p}", Box(381, 385, 33, 82)) for p in (1, 2, 3)]


def test_missing_empty_or_malformed_box_keeps_the_record_without_box(tmp_path, caplog):
    entries = [
        {"photo": 1, "product": 1},  # no bbox at all
        {"photo": 1, "product": 2, "bbox": bbox(5, 5, 0, 10)},  # zero width
        {"photo": 1, "product": 3, "bbox": None},
        {"photo": 1, "product": 4, "bbox": {"left": 1, "top": 1, "width": 5}},  # no height
        {"photo": 1, "product": 5, "bbox": bbox("a", 1, 2, 3)},
        {"photo": 1, "product": 6, "bbox": bbox(-4, 2, 10, 8)},  # past the left edge: clipped to 0,2,6,8
        {"photo": 1, "product": 7, "bbox": bbox(-10, 2, 10, 8)},  # entirely off the image
        {"photo": 1, "product": 8, "bbox": bbox(1, 2, 3, 4)},
    ]
    root = make_layout(tmp_path, {1: ".jpg"}, {"train_pairs_hats": entries})
    with caplog.at_level(logging.INFO, logger="street2shop.data.street2shop"):
        rs = read_street2shop(root)
    assert [(r.product_id, r.box) for r in rs] == [
        ("hats/1", None), ("hats/2", None), ("hats/3", None), ("hats/4", None), ("hats/5", None),
        ("hats/6", Box(0, 2, 6, 8)), ("hats/7", None), ("hats/8", Box(1, 2, 3, 4)),
    ]
    assert "6 boxes dropped" in caplog.text


def test_photos_missing_on_disk_are_counted_not_fatal(tmp_path, caplog):
    root = make_layout(
        tmp_path,
        {1: ".jpg", 3: ".jpg"},
        {
            "train_pairs_pants": [
                {"photo": 1, "product": 1, "bbox": bbox(0, 0, 2, 2)},
                {"photo": 2, "product": 1, "bbox": bbox(0, 0, 2, 2)},  # dead link
            ],
            "retrieval_pants": [{"photo": 3, "product": 1}, {"photo": 4, "product": 1}, {"photo": 4, "product": 2}],
        },
    )
    with caplog.at_level(logging.INFO, logger="street2shop.data.street2shop"):
        rs = read_street2shop(root)
    assert [name(r) for r in rs] == ["000000001.jpg", "000000003.jpg"]
    # photo 4 is named twice but listed once
    assert rs.missing == [str(tmp_path / "photos" / "000000002.jpg"), str(tmp_path / "photos" / "000000004.jpg")]
    assert "2 photos missing on disk (3 records skipped)" in caplog.text
    assert "2 records" in caplog.text


def test_missing_photo_is_fatal_when_strict(tmp_path):
    root = make_layout(tmp_path, {1: ".jpg"}, {"retrieval_dresses": [{"photo": 1, "product": 1}, {"photo": 2, "product": 1}]})
    with pytest.raises(DataError) as e:
        read_street2shop(root, strict=True)
    msg = str(e.value)
    assert "retrieval_dresses.json" in msg and "entry 1" in msg and "000000002" in msg


def test_empty_file_counts_as_missing(tmp_path):
    root = make_layout(tmp_path, {1: ".jpg"}, {"retrieval_dresses": [{"photo": 1, "product": 1}, {"photo": 2, "product": 1}]})
    (root / "photos" / "000000002.jpg").write_bytes(b"")
    rs = read_street2shop(root)
    assert [name(r) for r in rs] == ["000000001.jpg"]
    assert len(rs.missing) == 1


def test_photos_are_found_by_id_whatever_the_extension(tmp_path):
    root = make_layout(
        tmp_path,
        {1: ".jpg", 2: ".jpeg", 3: ".png", 4: ".JPG"},
        {"retrieval_eyewear": [{"photo": i, "product": i} for i in (1, 2, 3, 4)]},
    )
    (root / "photos" / "000000005.txt").write_text("not an image")
    (root / "photos" / "6.jpg").write_bytes((root / "photos" / "000000001.jpg").read_bytes())  # not zero-padded
    (root / "meta" / "json" / "retrieval_eyewear.json").write_text(
        json.dumps([{"photo": i, "product": i} for i in (1, 2, 3, 4, 5, 6)])
    )
    rs = read_street2shop(root)
    assert [name(r) for r in rs] == ["000000001.jpg", "000000002.jpeg", "000000003.png", "000000004.JPG", "6.jpg"]
    assert rs.missing == [str(root / "photos" / "000000005.jpg")]


def test_works_without_photos_txt(tmp_path):
    root = make_layout(tmp_path, {1: ".jpg"}, {"retrieval_bags": [{"photo": 1, "product": 1}, {"photo": 2, "product": 1}]},
                       photos_txt=False)
    assert not (root / "photos" / "photos.txt").exists()
    rs = read_street2shop(root)
    assert [name(r) for r in rs] == ["000000001.jpg"]
    assert len(rs.missing) == 1


def test_ids_not_in_photos_txt_are_reported(tmp_path, caplog):
    root = make_layout(tmp_path, {1: ".jpg", 2: ".jpg"}, {"retrieval_bags": [{"photo": 1, "product": 1}]})
    (root / "meta" / "json" / "retrieval_bags.json").write_text(json.dumps([{"photo": 1, "product": 1}, {"photo": 9, "product": 1}]))
    (root / "photos" / "photos.txt").write_text("000000001,http://x/1.jpg\ngarbage line\n000000002,http://x/2.jpg\n")
    with caplog.at_level(logging.INFO, logger="street2shop.data.street2shop"):
        rs = read_street2shop(root)
    assert len(rs) == 1
    assert "1 photo ids of the JSON files are not listed" in caplog.text
    assert "1 lines without a numeric id skipped (lines 2)" in caplog.text


def test_malformed_json_names_file_line_and_column(tmp_path):
    text = '[\n  {"photo": 1, "product": 2},\n  {"photo": 3 "product": 4}\n]'
    root = make_layout(tmp_path, {1: ".jpg"}, {"train_pairs_tops": text})
    with pytest.raises(DataError) as e:
        read_street2shop(root)
    msg = str(e.value)
    # the third line is `  {"photo": 3 "product": 4}`: the 15th character is the unexpected quote
    assert str(root / "meta" / "json" / "train_pairs_tops.json") in msg
    assert "line 3 column 15" in msg


@pytest.mark.parametrize(
    "content, words",
    [
        ({"photo": 1, "product": 1}, ["JSON list", "dict"]),
        ([{"photo": 1}], ["entry 0", "product=None"]),
        ([{"photo": 1, "product": 1}, {"photo": "x1", "product": 1}], ["entry 1", "photo='x1'"]),
        ([{"photo": 1, "product": 1}, [1, 1]], ["entry 1"]),
    ],
    ids=["not-a-list", "no-product", "bad-photo", "not-an-object"],
)
def test_malformed_entries_are_data_errors(tmp_path, content, words):
    root = make_layout(tmp_path, {1: ".jpg"}, {"retrieval_tops": content}, photos_txt=False)
    with pytest.raises(DataError) as e:
        read_street2shop(root)
    msg = str(e.value)
    assert "retrieval_tops.json" in msg
    for w in words:
        assert w in msg


def test_categories_present_or_named(tmp_path):
    root = make_layout(
        tmp_path,
        {1: ".jpg", 2: ".jpg", 3: ".jpg"},
        {
            "retrieval_bags": [{"photo": 1, "product": 1}],
            "retrieval_tops": [{"photo": 2, "product": 1}],
            "test_pairs_hats": [{"photo": 3, "product": 1, "bbox": bbox(0, 0, 1, 1)}],
        },
    )
    assert [r.category for r in read_street2shop(root)] == ["bags", "hats", "tops"]  # the paper's order
    assert [r.category for r in read_street2shop(root, categories=["tops", "bags"])] == ["tops", "bags"]
    assert [r.category for r in read_street2shop(root, categories="hats")] == ["hats"]
    with pytest.raises(DataError, match="Received: shoes"):
        read_street2shop(root, categories=["bags", "shoes"])
    with pytest.raises(DataError, match="Received: skirts"):
        read_street2shop(root, categories=["skirts"])


def test_eleven_categories():
    assert len(CATEGORIES) == 11 and list(CATEGORIES) == sorted(CATEGORIES)


def test_wrong_layout_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="meta"):
        read_street2shop(tmp_path)
    (tmp_path / "meta" / "json").mkdir(parents=True)
    (tmp_path / "photos").mkdir()
    with pytest.raises(DataError, match="Received: none"):
        read_street2shop(tmp_path)


def test_import_writes_a_manifest_that_reads_back(tmp_path):
    root = make_layout(
        tmp_path / "s2s",
        {1: ".jpg", 2: ".png", 3: ".jpg"},
        {
            "train_pairs_bags": [{"photo": 1, "product": 5, "bbox": bbox(1, 2, 3, 4)}, {"photo": 1, "product": 5, "bbox": bbox(0, 0, 2, 2)}],
            "test_pairs_bags": [{"photo": 9, "product": 5, "bbox": bbox(1, 2, 3, 4)}],
            "retrieval_bags": [{"photo": 2, "product": 5}, {"photo": 3, "product": 5}, {"photo": 3, "product": 6}],
        },
    )
    out = tmp_path / "out" / "manifest.csv"
    rs = import_street2shop(root, out, categories=["bags"])
    assert len(rs) == 5 and len(rs.missing) == 1
    back = read_manifest_csv(out, strict=True)
    assert back.records == rs.records
    assert Counter((r.domain, r.split) for r in back) == {("street", "train"): 2, ("shop", "catalog"): 3}
    assert back.products() == ["bags/5", "bags/6"]


def test_paths_are_absolute_even_for_a_relative_root(tmp_path, monkeypatch):
    make_layout(tmp_path / "s2s", {1: ".jpg"}, {"retrieval_bags": [{"photo": 1, "product": 1}, {"photo": 2, "product": 1}]})
    monkeypatch.chdir(tmp_path)
    rs = read_street2shop("s2s")
    assert rs.records[0].image_path == str(tmp_path / "s2s" / "photos" / "000000001.jpg")
    assert rs.missing == [str(tmp_path / "s2s" / "photos" / "000000002.jpg")]


def test_shop_photos_need_no_box_but_a_given_one_is_used(tmp_path, caplog):
    entries = [
        {"photo": 1, "product": 1},  # the usual: no box, nothing dropped
        {"photo": 1, "product": 2, "bbox": bbox(1, 2, 3, 4)},
        {"photo": 1, "product": 3, "bbox": bbox(1, 2, 0, 4)},  # given but empty: dropped
    ]
    root = make_layout(tmp_path, {1: ".jpg"}, {"retrieval_footwear": entries})
    with caplog.at_level(logging.INFO, logger="street2shop.data.street2shop"):
        rs = read_street2shop(root)
    assert [r.box for r in rs] == [None, Box(1, 2, 3, 4), None]
    assert "1 boxes dropped" in caplog.text
