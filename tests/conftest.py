import ctypes
import ctypes.util
import gc
import os
import sys

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


# --------------------------------------------------------------------------- memory: freed after each file, peak reported

RSS_BUDGET_GB = 4.0  # what one pytest worker may reach (issue 26); the summary marks a worker above it
_GROWTH: dict[str, float] = {}  # test file -> how much it raised this process's peak RSS, in GB


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def _release_memory() -> None:
    """Keras' global state cleared, garbage collected, the C heap's free pages handed back, what is left frozen.

    TensorFlow frees its buffers with the C library's allocator, which keeps freed memory for reuse: without the
    trim, the heap left by one file's models stays resident, fragmented, under the next file's. What is alive
    after a file and a collection (imports, session fixtures) lives on: ``gc.freeze`` takes it out of later
    collections, so the one after each test looks only at what tests made (0.1 s instead of about 1 s).
    """
    sys.modules["keras"].backend.clear_session()  # also gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):  # glibc
        ctypes.CDLL(libc).malloc_trim(0)
    gc.freeze()


def _forget_fastapi_apps() -> None:
    """FastAPI caches what it learns of each endpoint function in module-level ``lru_cache``s, which keep every app
    a test made alive, and with it the service and its loaded model (0.4 GB each for a tiny InceptionV3, as the tests' exports once were)."""
    models = sys.modules.get("fastapi.dependencies.models")
    for value in vars(models).values() if models else ():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


@pytest.fixture(autouse=True)
def _collect_after_each_test():
    """A model is cyclic garbage (its layers, variables and traced functions refer to one another), freed only by a
    collection, and Python's own full collections are rare: without this the models of a file's tests pile up."""
    yield
    _forget_fastapi_apps()
    if "keras" in sys.modules:  # files that never load Keras stay fast
        gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _free_tensorflow_state_after_each_file(request):
    """After a test file (its own module fixtures gone), what its models held is freed (issue 26: a worker reached 10.9 GB).

    Keras' state is cleared once per file, not per test: a file's module-scoped fixtures hold models its tests
    build on, and clearing Keras' names under them would let a new layer take a name the fixture's model uses.
    """
    before = _peak_rss_gb()
    yield
    _GROWTH[request.node.nodeid] = _peak_rss_gb() - before
    if "keras" in sys.modules:
        _release_memory()


def pytest_collection_finish(session):
    """What collection imported (TensorFlow, Keras, the package) lives to the end: out of every later collection."""
    gc.collect()
    gc.freeze()


def pytest_configure(config):
    config._peak_rss = {}  # worker id -> (peak RSS in GB, the files that raised it most), filled as the workers finish


def _largest_growth() -> list[tuple[str, float]]:
    return sorted(((f, g) for f, g in _GROWTH.items() if g >= 0.05), key=lambda fg: -fg[1])[:3]


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the numbers to the controller
        workeroutput["peak_rss_gb"] = _peak_rss_gb()
        workeroutput["rss_growth"] = _largest_growth()


@pytest.hookimpl(optionalhook=True)  # an xdist hook
def pytest_testnodedown(node, error):
    output = getattr(node, "workeroutput", {})
    if "peak_rss_gb" in output:
        node.config._peak_rss[node.gateway.id] = (output["peak_rss_gb"], output.get("rss_growth", []))


def pytest_terminal_summary(terminalreporter, config):
    """Each worker's peak resident memory (ru_maxrss) and the files that raised it most, so a leak shows in every run."""
    peaks = dict(config._peak_rss) or ({"main": (_peak_rss_gb(), _largest_growth())} if not hasattr(config, "workerinput") else {})
    if not peaks:
        return
    cells = ", ".join(f"{worker} {gb:.2f} GB" + (" (over the budget)" if gb > RSS_BUDGET_GB else "") for worker, (gb, _) in sorted(peaks.items()))
    terminalreporter.write_line(f"peak RSS per pytest process: {cells}; budget {RSS_BUDGET_GB:g} GB")
    for worker, (_, growth) in sorted(peaks.items()):
        if growth:
            terminalreporter.write_line(f"  {worker}, the files that raised it most: " + ", ".join(f"{f} +{g:.2f} GB" for f, g in growth))
