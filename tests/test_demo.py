"""The whole pipeline end to end, small: synth → train → export → stand-in server → embed over gRPC → index → evaluate → report."""

import json

import pytest

pytestmark = pytest.mark.slow(minutes=0.5)

from street2shop.cli import main
from street2shop.demo import DEMO_TRAINING, DemoConfig, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    config = DemoConfig(
        workdir=str(work), products=6, street_per_product=4,
        train=DEMO_TRAINING.replace(backbone="tiny_cnn", image_size=32, embedding_dim=8, epochs=1, pairs_per_epoch=32, batch_size=8),
    )
    return work, run_demo(config)


def test_demo_writes_every_report_file(demo):
    work, summary = demo
    for kind in ("json", "markdown", "plot", "html"):
        assert (work / "report").joinpath(summary["report"][kind].rsplit("/", 1)[1]).is_file(), kind
    assert (work / "exports" / "1" / "saved_model.pb").is_file()
    assert (work / "index-trained" / "1" / "manifest.json").is_file()


def test_report_json_matches_the_printed_numbers(demo):
    work, summary = demo
    report = json.loads((work / "report" / "report.json").read_text())
    for run in ("trained", "untrained"):
        overall = report["runs"][run]["metrics"]["overall"]
        assert overall["queries"] == 6 * 1  # 4 street photos per product, 1 of them in val
        top1 = overall["top_k"]["1"]
        assert f"top-1 {100 * top1:.1f}%" in summary[run]
        assert f"mAP {100 * overall['map']:.1f}%" in summary[run]
    md = (work / "report" / "report.md").read_text()
    assert "| trained | 6 |" in md and "| untrained | 6 |" in md


def test_search_and_evaluate_commands_on_the_demo_outputs(demo, capsys):
    work, _ = demo
    photo = next((work / "data" / "images" / "street").glob("p000_*.jpg"))
    assert main(["search", str(photo), "--index", str(work / "index-trained"), "--model", str(work / "exports"), "-k", "3", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)[str(photo)]
    assert [a["rank"] for a in answers] == [1, 2, 3]
    assert len({a["product_id"] for a in answers}) == 3
    out = work / "cli-report"
    assert main(["evaluate", str(work / "data" / "manifest.csv"), "--index", str(work / "index-trained"),
                 "--model", str(work / "exports"), "--out", str(out), "--no-by-category", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "report.json").read_text())["runs"]["model"]["metrics"]
    assert printed["overall"] == written["overall"]
    # the index was built from another model: refused with a one-line error
    assert main(["search", str(photo), "--index", str(work / "index-trained"), "--model", str(work / "exports-untrained")]) == 2
    assert "fingerprint" in capsys.readouterr().err
