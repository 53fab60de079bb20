import copy
import csv
import pickle
from pathlib import Path

import pytest

from street2shop.data.image import Box
from street2shop.data.records import Record, RecordSet, read_manifest_csv, write_manifest
from street2shop.errors import ConfigError, DataError

HEADER = "image_path,product_id,domain,split,category,bbox_left,bbox_top,bbox_width,bbox_height"
GROCERY = Path("/work/shared/data/grocery/manifest.csv")


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8 not really a jpeg")  # the reader only checks that the file exists
    return path


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def images(tmp_path):
    for name in ("a.jpg", "b.jpg", "sub/c.png"):
        touch(tmp_path / name)
    return tmp_path


def test_reads_rows_boxes_and_categories(images):
    m = write(
        images / "m.csv",
        HEADER,
        "a.jpg,p1,street,train,bags,10,20,30,40",
        "b.jpg,p1,shop,catalog,bags,,,,",
        "sub/c.png,p2,shop,catalog,,,,,",
    )
    rs = read_manifest_csv(m)
    assert isinstance(rs, RecordSet)
    assert rs.missing == []
    assert [(Path(r.image_path).name, r.product_id, r.domain, r.split, r.category) for r in rs] == [
        ("a.jpg", "p1", "street", "train", "bags"),
        ("b.jpg", "p1", "shop", "catalog", "bags"),
        ("c.png", "p2", "shop", "catalog", None),
    ]
    assert rs.records[0].box == Box(10, 20, 30, 40)
    assert rs.records[1].box is None and rs.records[2].box is None
    assert rs.products() == ["p1", "p2"]


def test_missing_required_column_names_file_and_line(images):
    m = write(images / "m.csv", "image_path,product_id,split", "a.jpg,p1,train")
    with pytest.raises(DataError) as e:
        read_manifest_csv(m)
    msg = str(e.value)
    assert str(m) in msg and "line 1" in msg and "domain" in msg


@pytest.mark.parametrize(
    "bad_row, words",
    [
        ("b.jpg,p2,customer,train,,,,,", ["domain", "customer"]),
        ("b.jpg,p2,street,train,,ten,20,30,40", ["box", "ten"]),
        ("b.jpg,p2,street,train,,10,20,,", ["box", "bbox_width"]),
        ("b.jpg,p2,street,train,,10,20,-5,40", ["box", "width"]),
        ("b.jpg,p2,street,train,,10,20,30,0", ["box", "height"]),
        ("b.jpg,p2,street,train,,10,20,30,40,extra", ["10 fields", "9"]),
        ("b.jpg,,street,train,,,,,", ["product_id"]),
        ("b.jpg,  ,street,train,,,,,", ["product_id"]),
    ],
    ids=["unknown-domain", "non-numeric-box", "partial-box", "negative-width", "zero-height", "too-many-fields",
         "empty-product", "blank-product"],
)
def test_row_errors_name_file_and_line(images, bad_row, words):
    # header is line 1, a good row line 2, the bad row line 3
    m = write(images / "m.csv", HEADER, "a.jpg,p1,street,train,,,,,", bad_row, "a.jpg,p3,shop,catalog,,,,,")
    with pytest.raises(DataError) as e:
        read_manifest_csv(m)
    msg = str(e.value)
    assert str(m) in msg
    assert "line 3" in msg
    for w in words:
        assert w in msg


def test_missing_manifest_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.csv"):
        read_manifest_csv(tmp_path / "nope.csv")


def test_missing_images_are_counted_not_fatal(images):
    m = write(
        images / "m.csv",
        HEADER,
        "a.jpg,p1,street,train,,,,,",
        "gone1.jpg,p1,shop,catalog,,,,,",
        "b.jpg,p2,shop,catalog,,,,,",
        "sub/gone2.jpg,p2,street,test,,,,,",
    )
    rs = read_manifest_csv(m)
    assert [Path(r.image_path).name for r in rs] == ["a.jpg", "b.jpg"]
    assert rs.missing == [str(images / "gone1.jpg"), str(images / "sub" / "gone2.jpg")]
    assert "2 missing" in rs.summary()


def test_missing_image_is_fatal_when_strict(images):
    m = write(images / "m.csv", HEADER, "a.jpg,p1,street,train,,,,,", "gone.jpg,p1,shop,catalog,,,,,")
    with pytest.raises(DataError) as e:
        read_manifest_csv(m, strict=True)
    msg = str(e.value)
    assert str(m) in msg and "line 3" in msg and "gone.jpg" in msg


def test_check_files_false_keeps_rows_of_absent_images(tmp_path):
    m = write(tmp_path / "m.csv", HEADER, "gone.jpg,p1,shop,catalog,,,,,")
    rs = read_manifest_csv(m, check_files=False)
    assert len(rs) == 1 and rs.missing == []


def test_unknown_columns_are_kept_as_metadata(images):
    m = write(
        images / "m.csv",
        "colour,image_path,product_id,domain,split,price",
        "red,a.jpg,p1,street,train,9.99",
        "blue,b.jpg,p2,shop,catalog,",
    )
    rs = read_manifest_csv(m)
    assert dict(rs.records[0].metadata) == {"colour": "red", "price": "9.99"}
    assert dict(rs.records[1].metadata) == {"colour": "blue", "price": ""}
    assert rs.records[0].category is None and rs.records[0].box is None


def test_relative_paths_are_relative_to_the_manifest_not_the_cwd(images, tmp_path_factory, monkeypatch):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    outside = touch(elsewhere / "abs.jpg")
    monkeypatch.chdir(elsewhere)
    m = write(images / "m.csv", HEADER, "sub/c.png,p1,shop,catalog,,,,,", f"{outside},p1,street,train,,,,,")
    rs = read_manifest_csv(m)
    assert rs.missing == []
    assert Path(rs.records[0].image_path) == (images / "sub" / "c.png").resolve()
    assert Path(rs.records[0].image_path).is_absolute()
    assert Path(rs.records[1].image_path) == outside


def test_blank_lines_bom_and_spaces_in_header_are_tolerated(images):
    text = "\ufeffimage_path, product_id ,domain,split\n\na.jpg,p1,street,train\n\n"
    m = images / "m.csv"
    m.write_text(text, encoding="utf-8")
    rs = read_manifest_csv(m)
    assert [(r.product_id, r.domain) for r in rs] == [("p1", "street")]


def test_write_read_round_trip(images, tmp_path_factory):
    outside = touch(tmp_path_factory.mktemp("outside") / "far.jpg")
    records = [
        Record(str(images / "a.jpg"), "bags/76", "street", "train", "bags", Box(381, 385, 33, 82), {"photo_id": "11849", "note": ""}),
        Record(str(images / "a.jpg"), "bags/76", "street", "train", "bags", Box(0, 0.5, 12.25, 7), {"photo_id": "11849", "note": ""}),
        Record(str(images / "sub" / "c.png"), "p,2", "shop", "catalog", None, None, {"photo_id": "", "note": 'says "hi", twice'}),
        Record(str(outside), "p3", "shop", "catalog", "tops", None, {"photo_id": "7", "note": ""}),
    ]
    m = write_manifest(records, images / "m.csv")
    back = read_manifest_csv(m, strict=True)
    assert back.records == records
    assert [r.box for r in back] == [Box(381, 385, 33, 82), Box(0, 0.5, 12.25, 7), None, None]
    assert [dict(r.metadata) for r in back] == [dict(r.metadata) for r in records]
    # paths under the manifest's folder are written relative, others absolute
    with open(m, newline="", encoding="utf-8") as f:
        paths = [row["image_path"] for row in csv.DictReader(f)]
    assert paths == ["a.jpg", "a.jpg", "sub/c.png", str(outside)]


def test_metadata_columns_are_the_union_over_records(images):
    records = [
        Record(str(images / "a.jpg"), "p1", "shop", "catalog", metadata={"colour": "red"}),
        Record(str(images / "b.jpg"), "p2", "shop", "catalog", metadata={"size": "L"}),
    ]
    back = read_manifest_csv(write_manifest(records, images / "m.csv"))
    assert [dict(r.metadata) for r in back] == [{"colour": "red", "size": ""}, {"colour": "", "size": "L"}]


def test_write_is_atomic_and_leaves_no_temporary_file(images):
    write_manifest([Record(str(images / "a.jpg"), "p1", "shop", "catalog")], images / "m.csv")
    assert sorted(p.name for p in images.iterdir() if p.name.startswith(".")) == []


def test_metadata_cannot_overwrite_the_standard_columns(images):
    r = Record(str(images / "a.jpg"), "p1", "street", "train", "bags", Box(1, 2, 3, 4),
               {"product_id": "WRONG", "bbox_left": "99", "category": "WRONG", "extra": "x"})
    back = read_manifest_csv(write_manifest([r], images / "m.csv"))
    (got,) = back.records
    assert (got.product_id, got.category, got.box) == ("p1", "bags", Box(1, 2, 3, 4))
    assert dict(got.metadata) == {"extra": "x"}


def test_record_pickles_and_deep_copies():
    r = Record("/x/a.jpg", "p1", "street", "train", "bags", Box(1, 2, 3, 4), {"k": "v"})
    assert pickle.loads(pickle.dumps(r)) == r
    assert copy.deepcopy(r) == r
    assert dict(copy.deepcopy(r).metadata) == {"k": "v"}


@pytest.mark.skipif(not GROCERY.exists(), reason="grocery data set not present")
def test_grocery_manifest_reads_as_it_is():
    rs = read_manifest_csv(GROCERY, strict=True)
    assert len(rs) == 3017
    assert rs.missing == []
    assert sum(r.domain == "shop" for r in rs) == 81
    assert len(rs.products()) == 81
    assert {r.split for r in rs} == {"train", "val", "catalog"}
    assert {r.split for r in rs if r.domain == "shop"} == {"catalog"}
    assert set(rs.records[0].metadata) == {"product_name", "coarse_class", "supercategory", "width", "height"}


def test_symlinked_image_keeps_its_own_name(images, tmp_path_factory):
    target = touch(tmp_path_factory.mktemp("store") / "blob-123")
    link = images / "linked.jpg"
    link.symlink_to(target)
    m = write_manifest([Record(str(link), "p1", "shop", "catalog")], images / "m.csv")
    with open(m, newline="", encoding="utf-8") as f:
        assert [row["image_path"] for row in csv.DictReader(f)] == ["linked.jpg"]
    assert read_manifest_csv(m, strict=True).records[0].image_path == str(link)


def test_relative_image_path_is_written_absolute_when_outside(tmp_path, monkeypatch):
    touch(tmp_path / "cwd" / "a.jpg")
    monkeypatch.chdir(tmp_path / "cwd")
    m = write_manifest([Record("a.jpg", "p1", "shop", "catalog")], tmp_path / "out" / "m.csv")
    back = read_manifest_csv(m, strict=True)
    assert back.records[0].image_path == str(tmp_path / "cwd" / "a.jpg")


def test_manifest_rows_resolve_paths_under_any_root():
    """The one row parser, on an open stream: relative paths go under the root (a bucket too); absolute ones and URLs stay."""
    import io

    from street2shop.data.records import image_location, manifest_root, manifest_rows

    text = io.StringIO(f"{HEADER},colour\nimg/a.jpg,p1,shop,catalog,bags,,,,,red\n\ngs://other/b.jpg,p2,street,val,,1,2,3,4,\n/abs/c.png,p3,shop,catalog,,,,,,\n")
    rows = list(manifest_rows(text, "gs://bucket/manifests/part-0.csv", "gs://bucket/manifests"))
    assert [(line, r.image_path, r.product_id) for line, r in rows] == [
        (2, "gs://bucket/manifests/img/a.jpg", "p1"), (4, "gs://other/b.jpg", "p2"), (5, "/abs/c.png", "p3")]
    assert rows[0][1].metadata == {"colour": "red"} and rows[1][1].box == Box(1, 2, 3, 4)
    assert manifest_root("gs://bucket/manifests/part-0.csv") == "gs://bucket/manifests"
    assert image_location("img/a.jpg", "/data/shop") == "/data/shop/img/a.jpg"
    with pytest.raises(DataError, match="gs://bucket/m.csv line 2: domain must be"):
        list(manifest_rows(io.StringIO(f"{HEADER}\na.jpg,p,kitchen,catalog,,,,,\n"), "gs://bucket/m.csv", "gs://bucket"))


def test_catalogue_rows_are_the_shop_photos_of_the_splits():
    from street2shop.data.records import is_catalogue

    shop, street = Record("/a", "p", "shop", "catalog"), Record("/b", "p", "street", "catalog")
    assert is_catalogue(shop) and not is_catalogue(street)
    assert is_catalogue(shop, " val , catalog") and not is_catalogue(shop, "val")


def test_customer_photos_are_references_only_when_asked_and_only_of_the_reference_splits():
    from street2shop.data.records import is_catalogue

    shop, train, val = Record("/a", "p", "shop", "catalog"), Record("/b", "p", "street", "train"), Record("/c", "p", "street", "val")
    # Worked out from the rule: shop photos by --split, street photos only with street in domains, by --reference-splits.
    cases = [
        ({}, (True, False, False)),
        ({"domains": "shop,street"}, (True, True, False)),
        ({"domains": "street"}, (False, True, False)),
        ({"domains": " Street , shop ", "reference_splits": "train,val"}, (True, True, True)),
        ({"domains": "shop,street", "reference_splits": ""}, (True, True, True)),  # empty: every split, as --split
        ({"domains": "shop,street", "split": "val"}, (False, True, False)),       # --split is the shop photos' only
    ]
    for settings, expected in cases:
        split = settings.pop("split", "")
        assert tuple(is_catalogue(r, split, **settings) for r in (shop, train, val)) == expected, settings


@pytest.mark.parametrize("domains", ["", "shop,studio", "customer"])
def test_unknown_domains_are_refused(domains):
    from street2shop.data.records import is_catalogue, reference_domains

    with pytest.raises(ConfigError, match="domains must be shop, street or shop,street"):
        reference_domains(domains)
    with pytest.raises(ConfigError):
        is_catalogue(Record("/a", "p", "shop", "catalog"), domains=domains)


def test_catalogue_records_with_customer_photos_in_manifest_order(synth_dataset, tmp_path, caplog):
    from street2shop.data.records import catalogue_records

    records = read_manifest_csv(synth_dataset).records
    chosen = catalogue_records(synth_dataset, domains="shop,street", reference_splits="train")
    assert chosen == [r for r in records if r.domain == "shop" or r.split == "train"]  # the manifest's order, val left out
    assert [r.domain for r in chosen[:5]] == ["shop", "street", "street", "street", "shop"]  # this manifest interleaves them
    assert catalogue_records(synth_dataset) == [r for r in records if r.domain == "shop"]
    assert catalogue_records(synth_dataset, domains="street", reference_splits="val") == [r for r in records if r.split == "val"]
    # A domain asked for that selects nothing: the splits there are.
    with pytest.raises(DataError, match=r"no street photo of split\(s\) \['trian'\] .* in split\(s\) \['train', 'val'\]"
                                          r"\. Received: --reference-splits 'trian'"):
        catalogue_records(synth_dataset, domains="shop,street", reference_splits="trian")
    # A folder of images has no labels to make customer photos of.
    (tmp_path / "photos").mkdir()
    with pytest.raises(ConfigError, match="a folder of images holds catalogue photos only"):
        catalogue_records(tmp_path / "photos", domains="shop,street")
    # A product with customer photos but no catalogue photo is indexed, with a warning.
    orphan = Record(records[1].image_path, "no-shop-photo", "street", "train")
    write_manifest([*records, orphan], tmp_path / "orphan.csv")
    with caplog.at_level("WARNING", logger="street2shop.data.records"):
        chosen = catalogue_records(tmp_path / "orphan.csv", domains="shop,street")
    assert chosen[-1].product_id == "no-shop-photo"
    assert "1 product(s) have customer photos but no catalogue photo among the references (no-shop-photo)" in caplog.text
