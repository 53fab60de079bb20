"""Fixtures: a real small export (a tiny_cnn tower), the generated catalogue embedded by it, an index base, a service."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    import keras

    from street2shop.export import export_tower
    from street2shop.model.tower import build_tower

    keras.utils.set_random_seed(0)
    tower = build_tower("tiny_cnn", image_size=(75, 75), embedding_dim=16, weights=None)  # the service is tested, not the backbone
    return export_tower(tower, tmp_path_factory.mktemp("service-export") / "street2shop")


@pytest.fixture(scope="session")
def labelled_catalogue(synth_dataset, tmp_path_factory) -> Path:
    """The generated dataset's manifest with a product_name column (a label to show)."""
    from street2shop.data.records import Record, read_manifest_csv, write_manifest

    records = [Record(r.image_path, r.product_id, r.domain, r.split, r.category, r.box, {"product_name": f"Product {r.product_id}"})
               for r in read_manifest_csv(synth_dataset)]
    return write_manifest(records, synth_dataset.parent / "labelled.csv")


@pytest.fixture(scope="session")
def embeddings_dir(export_dir, labelled_catalogue, tmp_path_factory) -> Path:
    from street2shop.embed import embed_source

    out = tmp_path_factory.mktemp("service-embeddings")
    embed_source(labelled_catalogue, out, model=str(export_dir))
    return out


@pytest.fixture
def index_base(embeddings_dir, tmp_path) -> Path:
    from street2shop.index.build import build_index

    base = tmp_path / "index"
    build_index([embeddings_dir], base, kind="exact")
    return base


def make_jpeg(seed: int = 0, size=(60, 80)) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def swap_under_load(service, publish: Callable[[], object], search: Callable[[], object]) -> None:
    """Three threads ``search()`` while ``publish()`` writes index version 2 and the service's watcher swaps to it.

    None of the searches fails; those finished before the swap were answered by version 1, those sent after it by version 2.
    """
    answers, stop = [], threading.Event()  # (sent, answered, status, index version)

    def hammer():
        while not stop.is_set():
            sent = time.monotonic()
            r = search()
            answers.append((sent, time.monotonic(), r.status_code, r.json().get("index_version")))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    while len(answers) < 3:
        time.sleep(0.05)
    publish()  # version 2, while requests run
    swap_started = time.monotonic()
    assert service.watcher.check() is True
    swapped = time.monotonic()
    while sum(1 for a in answers if a[0] > swapped) < 3:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(30)
    assert {status for _, _, status, _ in answers} == {200}  # none failed
    assert {v for _, done, _, v in answers if done < swap_started} == {1}
    assert {v for sent, _, _, v in answers if sent > swapped} == {2}
