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


# --------------------------------------------------------------------------- peak memory per worker

RSS_BUDGET_GB = 4.0  # what one pytest worker may reach (issue 26); the summary marks a worker above it


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def pytest_configure(config):
    config._peak_rss = {}  # worker id -> peak RSS in GB, filled as the workers finish


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the number to the controller
        workeroutput["peak_rss_gb"] = _peak_rss_gb()


@pytest.hookimpl(optionalhook=True)  # an xdist hook
def pytest_testnodedown(node, error):
    peak = getattr(node, "workeroutput", {}).get("peak_rss_gb")
    if peak is not None:
        node.config._peak_rss[node.gateway.id] = peak


def pytest_terminal_summary(terminalreporter, config):
    """One line: each worker's peak resident memory (ru_maxrss), so a leak across tests shows in every run."""
    peaks = dict(config._peak_rss) or ({"main": _peak_rss_gb()} if not hasattr(config, "workerinput") else {})
    if not peaks:
        return
    cells = ", ".join(f"{worker} {gb:.2f} GB" + (" (over the budget)" if gb > RSS_BUDGET_GB else "") for worker, gb in sorted(peaks.items()))
    terminalreporter.write_line(f"peak RSS per pytest process: {cells}; budget {RSS_BUDGET_GB:g} GB")
