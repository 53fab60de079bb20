"""tools/bench_views.py's street-refs condition takes its references from the package (no training here)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def views():
    spec = importlib.util.spec_from_file_location("bench_views", ROOT / "tools" / "bench_views.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_street_refs_are_the_records_embed_indexes_and_the_ones_the_tool_used_before(views, synth_dataset):
    from street2shop.data.records import read_manifest_csv

    records = read_manifest_csv(synth_dataset).records
    gallery = [r for r in records if r.domain == "shop"]  # bench_retrieval's gallery
    command = {"manifest": str(synth_dataset), "train_split": "train"}
    # The records the tool indexed by hand before (the training street photos), in the same order.
    assert views.customer_references(command, gallery) == [r for r in records if r.domain == "street" and r.split == "train"]
    assert views.parse("street-refs+tta-flip") == (0, "flip", True)
    with pytest.raises(SystemExit, match="not this run's gallery"):
        views.customer_references(command, gallery[1:])
