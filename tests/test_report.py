import base64
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from street2shop.errors import ConfigError
from street2shop.evaluate import Evaluation, QueryResult, evaluate_embeddings
from street2shop.items import label_column_of
from street2shop.report import _thumbnail, hardest_products, headline, markdown_table, write_report
from tests.browser import launch, needs_chromium


def image(path, colour, size=(40, 40)):
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)
    return str(path)


def decode(uri):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")).astype(int)


def test_report_files_and_numbers(tmp_path):
    gallery = [image(tmp_path / f"g{i}.png", (60 * i, 0, 0)) for i in range(3)]
    queries = [image(tmp_path / f"q{i}.png", (0, 60 * i, 0)) for i in range(2)]
    g = np.eye(3, dtype=np.float32)
    q = np.array([[1, 0, 0], [0.1, 0.2, 1]], np.float32)  # q0 -> A (rank 1), q1 -> C first, B second
    ev = evaluate_embeddings(q, ["A", "B"], g, ["A", "B", "C"], query_paths=queries, gallery_paths=gallery, ks=(1, 2))
    paths = write_report({"run": ev}, tmp_path / "report", config={"k": 1})
    report = json.loads(paths["json"].read_text())
    run = report["runs"]["run"]
    assert run["metrics"]["overall"]["top_k"] == {"1": 0.5, "2": 1.0}
    assert run["by_category"] is False and run["searched"] == "the whole catalogue"
    assert report["config"] == {"k": 1}
    assert "| run | 2 | 50.0" in paths["markdown"].read_text() and "| the whole catalogue |" in paths["markdown"].read_text()
    assert Image.open(paths["plot"]).size[0] > 100
    page = paths["html"].read_text()
    # 2 queries (a crop each, no box so no whole-photo copy), each with all 3 products; the right one framed
    assert page.count('class="result hit"') == 2 and page.count("data:image/jpeg;base64,") == 2 + 2 * 3
    assert "rank 1" in page and "rank 2" in page and "the whole catalogue" in page
    # q1's similarities by hand: cos with C = 1 / |q1|, with B = 0.2 / |q1|
    norm = math.sqrt(0.1**2 + 0.2**2 + 1)
    assert f"similarity {1 / norm:.3f}" in page and f"similarity {0.2 / norm:.3f}" in page


def test_each_report_says_what_was_searched(tmp_path):
    g = np.eye(3, dtype=np.float32)
    q = np.array([[0.9, 0.1, 0.0]], np.float32)
    whole = evaluate_embeddings(q, ["B"], g, ["A", "B", "C"], ks=(1, 5, 20))
    within = evaluate_embeddings(q, ["B"], g, ["A", "B", "C"], query_categories=["x"], gallery_categories=["y", "x", "x"], ks=(1, 5, 20))
    assert whole.ranks == [2] and within.ranks == [1]  # the same query: harder against the whole catalogue
    assert headline(whole).endswith("(1 queries, whole catalogue)")
    assert headline(within).endswith("(1 queries, each within its category)")
    paths = write_report({"whole": whole, "within": within}, tmp_path / "r")
    runs = json.loads(paths["json"].read_text())["runs"]
    assert (runs["whole"]["searched"], runs["within"]["searched"]) == ("the whole catalogue", "the query's category only")
    assert runs["within"]["by_category"] is True
    md = paths["markdown"].read_text()
    assert "| the whole catalogue |" in md and "| the query's category only |" in md


def test_markdown_table_by_hand():
    runs = {"x": {"metrics": {"overall": {"queries": 4, "top_k": {1: 0.25}, "map": 0.5, "mrr": 0.5}}, "intervals": {"top_1": [0.0, 0.75]},
                  "searched": "the whole catalogue"}}
    assert "| x | 4 | 25.0 [0.0, 75.0] | 50.0 | 50.0 | the whole catalogue |" in markdown_table(runs)


def test_query_box_is_drawn(tmp_path):
    path = image(tmp_path / "q.png", (255, 255, 255))
    im = decode(_thumbnail(path, size=40, box=(10, 10, 20, 20)))
    assert im[10, 20, 0] > 180 and im[10, 20, 1] < 90  # red outline at the box's top edge
    assert im[20, 20].min() > 200  # inside stays white
    assert _thumbnail(str(tmp_path / "absent.png")) == ""


def test_the_query_crop_is_the_box_enlarged(tmp_path):
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, :100] = (200, 30, 30)  # left half red
    pixels[:, 100:] = (30, 30, 200)  # right half blue
    Image.fromarray(pixels).save(tmp_path / "street.png")
    crop = decode(_thumbnail(str(tmp_path / "street.png"), 224, (120, 20, 40, 56), crop=True))
    assert crop.shape == (224, 160, 3)  # 40 x 56 scaled by 4 to 224 high
    assert np.abs(crop[5:-5, 5:-5] - np.array([30, 30, 200])).max() < 30  # only the blue half: the box


def seven_products(tmp_path, labels=True):
    """7 one-image products whose similarities to one query are known by hand: the query's product ranks 7th."""
    colours = [(40 * i, 200 - 25 * i, 90) for i in range(7)]
    gallery = [image(tmp_path / f"g{i}.png", colours[i]) for i in range(7)]
    query = image(tmp_path / "q.png", (90, 90, 90), size=(80, 60))
    g = np.eye(8, dtype=np.float32)[:7]
    q = np.array([[7, 6, 5, 4, 3, 2, 1, 0]], np.float32)  # cos with product i: (7 - i) / sqrt(140)
    names = [{"product_name": f"Name {i}", "colour": f"c{i}"} if labels else {} for i in range(7)]
    ev = evaluate_embeddings(q, ["p6"], g, [f"p{i}" for i in range(7)], query_paths=[query], gallery_paths=gallery,
                             gallery_labels=names)
    ev.query_boxes = [(10, 5, 40, 30)]
    return ev, colours


def test_labels_scores_and_the_right_product_below_the_shown_ones(tmp_path):
    ev, _ = seven_products(tmp_path)
    assert ev.ranks == [7]
    page = write_report({"run": ev}, tmp_path / "report")["html"].read_text()
    assert label_column_of(ev.gallery_labels) == "product_name" and "<code>product_name</code>" in page
    # the top 5 with their names and similarities, by hand; the right product after them, framed, at rank 7
    for i in range(5):
        assert f'{i + 1}. <span class="name">Name {i}</span><span class="id">p{i}</span>' in page
        assert f"similarity {(7 - i) / math.sqrt(140):.3f}" in page
    assert page.count('class="result truth"') == 1 and page.count('class="result hit"') == 0
    truth = page.split('class="result truth"', 1)[1].split("</td>", 1)[0]
    assert "rank 7" in truth and "Name 6" in truth and f"similarity {1 / math.sqrt(140):.3f}" in truth
    assert "data:image/jpeg;base64," in truth  # its picture
    # the query: a crop and the whole photo with its box
    query = page.split('class="query"', 1)[1].split("</td>", 1)[0]
    assert 'class="crop"' in query and 'class="context"' in query and "Name 6" in query


def test_the_label_column_is_chosen_and_a_wrong_one_is_refused(tmp_path):
    ev, _ = seven_products(tmp_path)
    assert label_column_of(ev.gallery_labels, "colour") == "colour"
    page = write_report({"run": ev}, tmp_path / "r1", label_column="colour")["html"].read_text()
    assert '<span class="name">c0</span><span class="id">p0</span>' in page
    page = write_report({"run": ev}, tmp_path / "r2", label_column="")["html"].read_text()
    assert '1. <span class="name">p0</span></td>' not in page and '1. <span class="name">p0</span><span class="score">' in page
    with pytest.raises(ConfigError, match=r"no catalogue image has a 'name' column; the catalogue's other columns are \['colour', 'product_name'\]"):
        write_report({"run": ev}, tmp_path / "r3", label_column="name")
    assert not (tmp_path / "r3").exists()  # refused before writing
    (tmp_path / "bare").mkdir()
    bare, _ = seven_products(tmp_path / "bare", labels=False)
    assert label_column_of(bare.gallery_labels) == ""


def test_hardest_products_by_hand():
    gallery = ["A", "B", "C", "D"]
    results = [
        QueryResult("A", None, np.array([0, 1])),  # A first
        QueryResult("A", None, np.array([1, 0])),  # B first, A 2nd
        QueryResult("B", None, np.array([2, 3, 1])),  # C, D, B: rank 3
        QueryResult("B", None, np.array([2, 1])),  # C, B: rank 2
        QueryResult("B", None, np.array([3])),  # D, B not found
        QueryResult("C", None, np.array([2])),  # C first
        QueryResult("Z", None, np.array([0])),  # not in the catalogue: left out
    ]
    ranks = [1, 2, 3, 2, None, 1, None]
    ev = Evaluation({}, {}, ranks, results, [], gallery, [])
    rows = hardest_products(ev, {"B": "Bee"})
    assert [r["product_id"] for r in rows] == ["B", "A"]  # 3 misses, then 1; C never missed
    b = rows[0]
    assert (b["label"], b["queries"], b["found_first"], b["not_found"]) == ("Bee", 3, 0, 1)
    assert b["median_rank"] == 3  # ranks 2, 3, not found: the middle one
    assert b["mistaken_for"] == {"product_id": "C", "label": "", "times": 2}
    assert rows[1]["median_rank"] == 1 and rows[1]["mistaken_for"]["product_id"] == "B"


@needs_chromium
def test_the_page_in_headless_chromium_shows_every_image_and_frames_the_right_product(tmp_path):
    """Rendered, not only written: every image decodes, and the green frame is drawn around the right products' pictures."""
    from playwright.sync_api import sync_playwright

    colours = [(40 * i, 200 - 25 * i, 90) for i in range(7)]
    gallery = [image(tmp_path / f"g{i}.png", colours[i]) for i in range(7)]
    queries = [image(tmp_path / f"q{i}.png", (90, 90, 90), size=(80, 60)) for i in range(2)]
    g = np.eye(8, dtype=np.float32)[:7]
    q = np.array([[7, 6, 5, 4, 3, 2, 1, 0],  # p6 ranks 7th: shown after the top 5
                  [0, 1, 9, 0, 0, 0, 0, 0]], np.float32)  # p2 first
    ev = evaluate_embeddings(q, ["p6", "p2"], g, [f"p{i}" for i in range(7)], query_paths=queries, gallery_paths=gallery,
                             gallery_labels=[{"product_name": f"Name {i}"} for i in range(7)])
    ev.query_boxes = [(10, 5, 40, 30), (0, 0, 80, 60)]
    assert ev.ranks == [7, 1]
    html_path = write_report({"run": ev}, tmp_path / "report")["html"]
    green = np.array([26, 158, 58])
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(html_path.as_uri())
        page.wait_for_load_state("load")
        sizes = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert len(sizes) == 2 * 2 + 2 * 5 + 1 and all(done and w > 0 and h > 0 for done, w, h in sizes), sizes
        framed = page.locator("td.hit img, td.truth img")
        assert framed.count() == 2
        assert "rank 7" in page.locator("td.truth").inner_text() and "Name 6" in page.locator("td.truth").inner_text()
        for k in range(2):
            style = framed.nth(k).evaluate("i => [getComputedStyle(i).borderTopColor, getComputedStyle(i).borderTopWidth]")
            assert style == ["rgb(26, 158, 58)", "5px"], style
        shots = {}
        for name, locator in (("hit", page.locator("td.hit img")), ("truth", page.locator("td.truth img")),
                              ("miss", page.locator("td.miss img").first)):
            shots[name] = np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(int)
        browser.close()
    for name, product in (("hit", 2), ("truth", 6), ("miss", 0)):  # the first miss of the page: q0's rank 1, p0
        shot = shots[name]
        h, w, _ = shot.shape
        edges = [shot[2, w // 2], shot[h - 3, w // 2], shot[h // 2, 2], shot[h // 2, w - 3]]
        centre = shot[h // 2, w // 2]
        assert np.abs(centre - np.array(colours[product])).max() < 30, (name, centre)  # the product's own picture
        if name == "miss":
            assert all(np.abs(edge - green).max() > 60 for edge in edges), (name, edges)
        else:
            assert all(np.abs(edge - green).max() < 30 for edge in edges), (name, edges)  # framed on all four sides


def test_a_match_at_a_customer_photo_shows_the_catalogue_photo_marked_and_the_json_counts_it(tmp_path):
    """Gallery: A's catalogue photo (red), B's (green), A's customer photo (blue), C's customer photo (yellow; C has no
    catalogue photo). q0 lies nearest A's customer photo, q1 nearest B's catalogue photo (rankings by hand below)."""
    colours = {"A": (220, 30, 30), "B": (30, 200, 30), "A-street": (30, 30, 220), "C-street": (230, 220, 20)}
    gallery = [image(tmp_path / f"{name}.png", colour) for name, colour in colours.items()]
    queries = [image(tmp_path / f"q{i}.png", (90, 90, 90)) for i in range(2)]
    g = np.eye(4, dtype=np.float32)
    q = np.array([[0.1, 0, 1, 0],    # rows 2 (A, customer photo), 0; then B (row 1) and C (row 3) at cosine 0, by row
                  [0, 1, 0, 0.5]], np.float32)  # B (row 1), C (row 3, customer photo), then A at row 0
    ev = evaluate_embeddings(q, ["A", "B"], g, ["A", "B", "A", "C"], query_paths=queries, gallery_paths=gallery,
                             gallery_domains=["shop", "shop", "street", "street"])
    assert ev.ranks == [1, 1]
    paths = write_report({"run": ev}, tmp_path / "report")
    run = json.loads(paths["json"].read_text())["runs"]["run"]
    assert run["references"] == {"shop": 2, "street": 2, "products_with_customer_photos": 2}
    assert (run["first_matched_customer_photo"], run["right_first_at_customer_photo"], run["queries"]) == (1, 1, 2)
    page = paths["html"].read_text()
    assert "The index holds 2 catalogue photos and 2 customer photos (of 2 products)" in page
    rows = page.split('<td class="query">')[1:]
    cells = [[cell.split("</td>", 1)[0] for cell in row.split('<td class="result')[1:]] for row in rows]
    marked = [["matched a customer photo" in cell for cell in row] for row in cells]
    assert marked == [[True, False, True], [False, True, False]]
    # q0's first answer, A: its catalogue photo (red) large, the customer photo it matched (blue) small beside the mark.
    first = cells[0][0]
    pictures = [decode(uri.split('"', 1)[0]) for uri in first.split('src="')[1:]]
    assert len(pictures) == 2
    assert np.abs(pictures[0][10, 10] - colours["A"]).max() < 30 and np.abs(pictures[1][5, 5] - colours["A-street"]).max() < 30
    # C has no catalogue photo: no picture of it, only the customer photo it matched, small.
    third = cells[0][2]
    assert '<div class="nophoto">no catalogue photo</div>' in third and third.count('src="data:image/jpeg') == 1
    # Without customer photos in the gallery, nothing of this is said.
    plain = write_report({"run": evaluate_embeddings(q, ["A", "B"], g[:2], ["A", "B"])}, tmp_path / "plain")
    assert "customer photo" not in plain["html"].read_text()
    assert json.loads(plain["json"].read_text())["runs"]["run"]["references"]["street"] == 0
