"""The whole pipeline end to end: ``street2shop demo`` (and ``make demo``).

synthesise a dataset (or take ``--data MANIFEST``) → train briefly → export
``best.keras`` (the epoch of the lowest validation loss) as a SavedModel →
start the local stand-in server → embed the catalogue over gRPC → build the
Annoy index → evaluate the held-out street photos through the server and the
index, against the whole catalogue, for the trained tower and for the
untrained one → write the report (JSON, Markdown, PNG, HTML) and print where
it is.

The server it starts is stopped on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from street2shop.config import TrainConfig, setting
from street2shop.contract import DEFAULT_MODEL_NAME
from street2shop.errors import DataError

logger = logging.getLogger(__name__)

# The demo's brief training: from scratch, small inputs, a few hundred pairs an epoch.
DEMO_TRAINING = TrainConfig().replace(
    weights="none", image_size=75, embedding_dim=64, epochs=6, pairs_per_epoch=640, batch_size=32,
    learning_rate=1e-3, bn_momentum=0.9,
)
# Fields the demo sets itself from its own (manifest, query split, work folder).
DEMO_SETS = frozenset({"manifest", "val_split", "output_dir", "val_pairs"})


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. Defaults fit in a few minutes on 2 CPU cores.

    Each field with a help text is the ``street2shop demo`` flag of the same
    name. ``by_category`` is off by default, as in ``evaluate``: a shop's
    search ranks the whole catalogue, the harder test. The generated dataset
    is seeded by ``train.fit.seed``.

    Args:
        verbose: what is shown of training (``train``'s ``verbose``: 0 nothing,
            1 a bar, 2 a line per epoch, "auto" a bar on a terminal).
        train: TrainConfig. The brief training (:data:`DEMO_TRAINING`); its
            ``manifest``, ``val_split``, ``output_dir`` and ``val_pairs`` are
            set by the demo.
    """

    workdir: str = setting("demo-output", "folder for everything the demo writes (data, run, exports, indexes, report)")
    data: str = setting("", "a manifest to use instead of the generated dataset")
    eval_split: str = setting("val", "split of the street photos used as queries")
    products: int = setting(30, "products in the generated dataset")
    street_per_product: int = setting(8, "street photos per generated product")
    by_category: bool = setting(False, "search only the query's category")
    model_name: str = setting(DEFAULT_MODEL_NAME, "model name the stand-in server answers to")
    verbose: int | str = "auto"
    train: TrainConfig = DEMO_TRAINING

    def training(self, manifest: str | Path) -> TrainConfig:
        """The training configuration of a run on ``manifest``."""
        return self.train.replace(
            manifest=str(manifest), val_split=self.eval_split, output_dir=str(Path(self.workdir) / "run"),
            val_pairs=4 * self.train.fit.batch_size,
        )


class _Step:
    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        self.n += 1
        logger.info("[%d/%d %4.0fs] %s", self.n, self.total, time.perf_counter() - self.start, text)


def _serve_and_evaluate(name: str, version_dir: Path, work: Path, gallery, queries, config: DemoConfig, step) -> Any:
    """Serves one export with the stand-in, embeds the catalogue over gRPC, indexes it, evaluates the queries."""
    from street2shop.embed import embed_catalog, reset
    from street2shop.embedders import GrpcEmbedder
    from street2shop.evaluate import evaluate_queries
    from street2shop.index import load_index
    from street2shop.index.build import build_index
    from street2shop.serving.server import StandInServer

    with StandInServer(version_dir.parent, model_name=config.model_name, port=0) as server:
        step(f"{name}: stand-in TF Serving on 127.0.0.1:{server.port} serving {version_dir}")
        with GrpcEmbedder(f"127.0.0.1:{server.port}", model_name=config.model_name) as embedder:
            for folder in (work / f"embeddings-{name}", work / f"index-{name}"):
                reset(folder)  # the demo owns its workdir: a re-run starts clean
            embedded = embed_catalog(gallery, embedder, work / f"embeddings-{name}")
            built = build_index([embedded.out_dir], work / f"index-{name}")
            index = load_index(built["index"])
            step(f"{name}: embedded {len(embedded.items)} catalogue images over gRPC ({embedded.identity}), Annoy index at {built['index']}")
            evaluation = evaluate_queries(queries, embedder, index, by_category=config.by_category)
    return evaluation


def run_demo(config: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Runs the demo; returns the report paths and the headline numbers."""
    import keras

    from street2shop.data.records import read_manifest_csv
    from street2shop.data.synthetic import generate
    from street2shop.export import export_checkpoint, export_tower
    from street2shop.report import headline, write_report
    from street2shop.callbacks import best_checkpoint_from_epoch
    from street2shop.compile import build_model
    from street2shop.runlog import LOG_FILE, best_logged_epoch
    from street2shop.train import train

    work = Path(config.workdir)
    work.mkdir(parents=True, exist_ok=True)
    step = _Step(8)
    seed = config.train.fit.seed
    if config.data:
        manifest = Path(config.data)
        step(f"using your dataset {manifest}")
    else:
        generate(work / "data", products=config.products, street_per_product=config.street_per_product, seed=seed)
        manifest = work / "data" / "manifest.csv"
        step(f"generated {config.products} products x {config.street_per_product} street photos: {manifest}")
    records = read_manifest_csv(manifest)
    queries = [r for r in records if r.domain == "street" and r.split == config.eval_split]
    gallery = [r for r in records if r.domain == "shop"]
    if not queries or not gallery:
        raise DataError(f"{manifest}: the demo needs street photos of split {config.eval_split!r} and shop photos. "
                        f"Received: {len(queries)} queries, {len(gallery)} shop photos")

    train_config = config.training(manifest)
    exports = work / "exports"
    # The untrained tower, for comparison: same architecture and seed, no training.
    keras.utils.set_random_seed(seed)
    untrained = build_model(train_config, None)
    untrained_dir = export_tower(untrained, work / "exports-untrained", model_name=config.model_name)
    tc = train_config
    step(f"training {tc.model.backbone} at {tc.data.image_size}px for {tc.fit.epochs} epochs of {tc.data.pairs_per_epoch} pairs")
    result = train(train_config, verbose=config.verbose)
    # The rule of the tour too: export best.keras, the epoch of the lowest validation loss.
    version_dir = Path(export_checkpoint(result.best_checkpoint, exports, model_name=config.model_name)["path"])
    # Which epoch that is, from the whole log (a resumed run's too), by the rule best.keras was chosen by.
    monitor = "val_loss" if result.history.get("val_loss") else "loss"
    found = best_logged_epoch(result.output_dir / LOG_FILE, monitor, from_epoch=best_checkpoint_from_epoch(tc))
    best = f"epoch {found[0] + 1} of {tc.fit.epochs}" if found else "the best epoch"
    step(f"exported {best} ({result.best_checkpoint.name}, lowest {monitor.replace('_', ' ')}) to {version_dir}")

    evaluations = {}
    evaluations["trained"] = _serve_and_evaluate("trained", version_dir, work, gallery, queries, config, step)
    evaluations["untrained"] = _serve_and_evaluate("untrained", untrained_dir, work, gallery, queries, config, step)
    demo_settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "train"}
    paths = write_report(evaluations, work / "report", config={"demo": demo_settings, "train": train_config.to_dict()},
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
