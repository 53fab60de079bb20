import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """A small generated street/shop dataset: 6 products x 4 street photos, 64 px."""
    from street2shop.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, products=6, street_per_product=4, image_size=64, seed=0, categories=3)
    return out / "manifest.csv"


def pytest_collection_modifyitems(config, items):
    """The slow tests first, the longest first (``@pytest.mark.slow(minutes=N)``; a stable sort).

    Under ``-n 2 --dist loadfile --no-loadscope-reorder`` (``make test``) a file that takes minutes, collected
    late, would run alone on one worker after the other had finished everything else. ``minutes`` only orders
    the tests: no verdict depends on it.
    """

    def minutes(item):
        slow = item.get_closest_marker("slow")
        return 0.0 if slow is None else float(slow.kwargs.get("minutes", 1.0))

    items.sort(key=lambda item: -minutes(item))
