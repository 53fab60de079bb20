import base64
import io
import json

import numpy as np
from PIL import Image

from street2shop.evaluate import evaluate_embeddings
from street2shop.report import _thumbnail, markdown_table, write_report


def image(path, colour):
    Image.fromarray(np.full((40, 40, 3), colour, np.uint8)).save(path)
    return str(path)


def test_report_files_and_numbers(tmp_path):
    gallery = [image(tmp_path / f"g{i}.png", (60 * i, 0, 0)) for i in range(3)]
    queries = [image(tmp_path / f"q{i}.png", (0, 60 * i, 0)) for i in range(2)]
    g = np.eye(3, dtype=np.float32)
    q = np.array([[1, 0, 0], [0.1, 0.2, 1]], np.float32)  # q0 -> A (rank 1), q1 -> C first, B second
    ev = evaluate_embeddings(q, ["A", "B"], g, ["A", "B", "C"], query_paths=queries, gallery_paths=gallery, ks=(1, 2))
    paths = write_report({"run": ev}, tmp_path / "report", config={"k": 1})
    report = json.loads(paths["json"].read_text())
    assert report["runs"]["run"]["metrics"]["overall"]["top_k"] == {"1": 0.5, "2": 1.0}
    assert report["config"] == {"k": 1}
    assert "| run | 2 | 50.0" in paths["markdown"].read_text()
    assert Image.open(paths["plot"]).size[0] > 100
    page = paths["html"].read_text()
    assert page.count('class="hit"') == 2 and page.count("data:image/jpeg;base64,") == 2 + 2 * 3  # 2 queries, each with all 3 products
    assert "rank 1" in page and "rank 2" in page


def test_markdown_table_by_hand():
    runs = {"x": {"metrics": {"overall": {"queries": 4, "top_k": {1: 0.25}, "map": 0.5, "mrr": 0.5}}, "intervals": {"top_1": [0.0, 0.75]}}}
    assert "| x | 4 | 25.0 [0.0, 75.0] | 50.0 | 50.0 |" in markdown_table(runs)


def test_query_box_is_drawn(tmp_path):
    path = image(tmp_path / "q.png", (255, 255, 255))
    uri = _thumbnail(path, size=40, box=(10, 10, 20, 20))
    im = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")).astype(int)
    assert im[10, 20, 0] > 180 and im[10, 20, 1] < 90  # red outline at the box's top edge
    assert im[20, 20].min() > 200  # inside stays white
    assert _thumbnail(str(tmp_path / "absent.png")) == ""
