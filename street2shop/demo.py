"""The whole pipeline end to end: ``street2shop demo`` (and ``make demo``).

synthesise a dataset (or take ``--data MANIFEST``) → train briefly → export a
SavedModel → start the local stand-in server → embed the catalogue over gRPC
→ build the Annoy index → evaluate the held-out street photos through the
server and the index, for the trained tower and for the untrained one → write
the report (JSON, Markdown, PNG, HTML) and print where it is.

The server it starts is stopped on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from street2shop.errors import DataError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. Defaults fit in a few minutes on 2 CPU cores.

    Args:
        workdir: str. Everything goes here (data, run, exports, index, report).
        data: str. A manifest to use instead of generating one.
        eval_split: str. Split of the street photos used as queries.
        products, street_per_product, seed: the generated dataset.
        backbone, image_size, embedding_dim, weights: the tower.
        epochs, pairs_per_epoch, batch_size, learning_rate: the brief training.
        bn_momentum: float. BatchNorm momentum of the backbone (0.9 suits a
            short run from scratch; see ModelConfig.bn_momentum).
        w_product: float. Weight of the softmax over the training products
            (0 = pairs only); it gave the best results on real photos
            (BENCHMARKS.md).
        by_category: bool. Search only the query's category (the Exact
            Street2Shop protocol). Off by default here: the synthetic
            categories are silhouettes, and ranking all products is the
            harder, more telling test.
        model_name: str. Name the stand-in server answers to.
        verbose: int. Keras' fit verbosity (0 silent, 2 a line per epoch).
    """

    workdir: str = "demo-output"
    data: str = ""
    eval_split: str = "val"
    products: int = 30
    street_per_product: int = 8
    seed: int = 0
    backbone: str = "inception_v3"
    image_size: int = 75
    embedding_dim: int = 64
    weights: str = "none"
    epochs: int = 6
    pairs_per_epoch: int = 640
    batch_size: int = 32
    learning_rate: float = 1e-3
    bn_momentum: float = 0.9
    w_product: float = 0.5
    by_category: bool = False
    model_name: str = "street2shop"
    verbose: int = 2


class _Step:
    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        self.n += 1
        logger.info("[%d/%d %4.0fs] %s", self.n, self.total, time.perf_counter() - self.start, text)


def _serve_and_evaluate(name: str, version_dir: Path, work: Path, gallery, queries, config: DemoConfig, step) -> Any:
    from street2shop.embed import embed_catalog, reset
    from street2shop.evaluate import evaluate_queries
    from street2shop.export import read_card
    from street2shop.index import CatalogIndex, Item
    from street2shop.serving.client import EmbeddingClient
    from street2shop.serving.server import StandInServer

    card = read_card(version_dir)
    with StandInServer(version_dir.parent, model_name=config.model_name, port=0) as server:
        port = server.port
        step(f"{name}: stand-in TF Serving on 127.0.0.1:{port} serving {version_dir}")
        with EmbeddingClient(f"127.0.0.1:{port}", config.model_name, expected_dimension=card["dimension"]) as client:
            reset(work / f"embeddings-{name}")  # the demo owns its workdir: a re-run starts clean
            embedded = embed_catalog(gallery, client, work / f"embeddings-{name}", fingerprint=card["fingerprint"])
            index = CatalogIndex(card["dimension"], model_fingerprint=card["fingerprint"])
            index.add(embedded.embeddings, [Item(it["product_id"], it["image_path"], it["category"]) for it in embedded.items])
            index.build()
            index_dir = index.save(work / f"index-{name}")
            index = CatalogIndex.load(index_dir, expected_fingerprint=card["fingerprint"], expected_dimension=card["dimension"])
            step(f"{name}: embedded {len(embedded.items)} catalogue images over gRPC, Annoy index at {index_dir}")
            evaluation = evaluate_queries(queries, client, index, by_category=config.by_category)
    return evaluation


def run_demo(config: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Runs the demo; returns the report paths and the headline numbers."""
    import keras

    from street2shop.config import TrainConfig
    from street2shop.data.records import read_manifest
    from street2shop.data.synthetic import generate
    from street2shop.export import export_tower
    from street2shop.report import headline, write_report
    from street2shop.train import build_model, train

    work = Path(config.workdir)
    work.mkdir(parents=True, exist_ok=True)
    step = _Step(8)
    if config.data:
        manifest = Path(config.data)
        step(f"using your dataset {manifest}")
    else:
        generate(work / "data", products=config.products, street_per_product=config.street_per_product, seed=config.seed)
        manifest = work / "data" / "manifest.csv"
        step(f"generated {config.products} products x {config.street_per_product} street photos: {manifest}")
    records = read_manifest(manifest)
    queries = [r for r in records if r.domain == "street" and r.split == config.eval_split]
    gallery = [r for r in records if r.domain == "shop"]
    if not queries or not gallery:
        raise DataError(f"{manifest}: the demo needs street photos of split {config.eval_split!r} and shop photos. "
                        f"Received: {len(queries)} queries, {len(gallery)} shop photos")

    train_config = TrainConfig().replace(
        manifest=str(manifest), val_split=config.eval_split, backbone=config.backbone, weights=config.weights,
        image_size=config.image_size, embedding_dim=config.embedding_dim, epochs=config.epochs,
        pairs_per_epoch=config.pairs_per_epoch, batch_size=config.batch_size, learning_rate=config.learning_rate,
        output_dir=str(work / "run"), seed=config.seed, val_pairs=4 * config.batch_size, bn_momentum=config.bn_momentum,
        w_product=config.w_product,
    )
    exports = work / "exports"
    # The untrained tower, for comparison: same architecture and seed, no training.
    keras.utils.set_random_seed(config.seed)
    untrained = build_model(train_config, None)
    untrained_dir = export_tower(untrained, work / "exports-untrained", model_name=config.model_name)
    step(f"training {config.backbone} at {config.image_size}px for {config.epochs} epochs of {config.pairs_per_epoch} pairs")
    result = train(train_config, verbose=config.verbose)
    version_dir = export_tower(result.model, exports, model_name=config.model_name)
    step(f"exported the trained tower to {version_dir}")

    evaluations = {}
    evaluations["trained"] = _serve_and_evaluate("trained", version_dir, work, gallery, queries, config, step)
    evaluations["untrained"] = _serve_and_evaluate("untrained", untrained_dir, work, gallery, queries, config, step)
    paths = write_report(evaluations, work / "report", config={"demo": dataclasses.asdict(config), "train": train_config.to_dict()},
                         title=f"street2shop demo: {len(queries)} street photos vs {len(gallery)} shop photos")
    step(f"report written to {paths['html'].parent}")
    return {
        "report": {k: str(v) for k, v in paths.items()},
        "trained": headline(evaluations["trained"]),
        "untrained": headline(evaluations["untrained"]),
        "train_seconds": round(result.seconds, 1),
        "pairs_per_second": round(result.pairs_per_second, 1),
        "metrics": {name: ev.metrics["overall"] for name, ev in evaluations.items()},
    }
