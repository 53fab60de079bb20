"""The ``street2shop`` command line.

Each subcommand ends in one library call whose keyword arguments are the
flags' names. Heavy modules are imported by the command that needs them, so
``street2shop --help`` is instant. A :class:`Street2ShopError` becomes a
one-line message on stderr and exit code 2; nothing expected prints a
traceback (``-v`` adds logging, ``--debug`` shows tracebacks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from street2shop import __version__
from street2shop.errors import Street2ShopError

logger = logging.getLogger("street2shop")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# --------------------------------------------------------------------------- data


def cmd_data_synth(args: argparse.Namespace) -> int:
    from street2shop.data.synthetic import generate

    records = generate(
        args.out, products=args.products, street_per_product=args.street_per_product,
        shop_per_product=args.shop_per_product, image_size=args.image_size, seed=args.seed,
    )
    summary = {"manifest": os.path.join(args.out, "manifest.csv"), "images": len(records), "products": len(records.products())}
    _print_json(summary) if args.json else print(f"wrote {summary['images']} images of {summary['products']} products; manifest: {summary['manifest']}")
    return 0


def cmd_data_import_street2shop(args: argparse.Namespace) -> int:
    from street2shop.data.street2shop import import_street2shop

    categories = [c for c in (args.categories or "").split(",") if c] or None
    records = import_street2shop(args.root, args.output, categories=categories, strict=args.strict)
    result = {"manifest": args.output, "records": len(records), "products": len(records.products()), "missing": len(records.missing)}
    _print_json(result) if args.json else print(records.summary() + f"\nmanifest: {args.output}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from street2shop.data.pipeline import check_images
    from street2shop.data.records import read_manifest

    records = read_manifest(args.manifest, strict=args.strict)
    good, report = check_images(records.records)
    result = {
        "manifest": args.manifest, "records": len(records), "missing": records.missing,
        "unreadable": report.bad_images, "empty_boxes": [p for p, _ in report.empty_boxes], "usable": len(good),
    }
    if args.json:
        _print_json(result)
    else:
        print(records.summary())
        print(report.summary())
        for path, error in report.bad_images.items():
            print(f"  unreadable: {path}: {error}")
    return 0


# --------------------------------------------------------------------------- train / export / serve


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from street2shop.config import TrainConfig

    parser.add_argument("--config", help="TOML or JSON config file; flags given here override it")
    for section, kind in TrainConfig.SECTIONS.items():
        group = parser.add_argument_group(f"[{section}]")
        for field in dataclasses.fields(kind):
            flag = "--" + field.name.replace("_", "-")
            kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": f"{field.metadata.get('help', '')} (default: {field.default!r})"}
            if field.type in (bool, "bool"):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["metavar"] = field.name.upper()
            group.add_argument(flag, **kwargs)


def _resolve_train_config(args: argparse.Namespace):
    from street2shop.config import TrainConfig, field_owners, load_config

    config = load_config(args.config) if args.config else TrainConfig()
    overrides = {k: v for k, v in vars(args).items() if k in field_owners()}
    return config.replace(**overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from street2shop.train import train

    config = _resolve_train_config(args)
    result = train(config, verbose=0 if args.json else (1 if sys.stdout.isatty() else 2))
    summary = {
        "output_dir": str(result.output_dir), "best_checkpoint": str(result.best_checkpoint),
        "last_checkpoint": str(result.last_checkpoint), "epochs_run": len(next(iter(result.history.values()), [])),
        "seconds": round(result.seconds, 1), "pairs_per_second": round(result.pairs_per_second, 2),
        "final": {k: v[-1] for k, v in result.history.items() if v},
    }
    _print_json(summary) if args.json else print(f"best checkpoint: {result.best_checkpoint}\nlast checkpoint: {result.last_checkpoint}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from street2shop.export import export_tower, load_checkpoint, read_card

    model = load_checkpoint(args.checkpoint)
    path = export_tower(model, args.export_base, version=args.version, model_name=args.model_name)
    card = read_card(path)
    _print_json({"path": str(path), **card}) if args.json else print(f"exported {path} (dimension {card['dimension']}, fingerprint {card['fingerprint']})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from street2shop.serving.server import serve

    serve(args.export_base, port=args.port, host=args.host, model_name=args.model_name,
          max_batch_size=args.max_batch_size)
    return 0


# --------------------------------------------------------------------------- embed / index / search / evaluate / demo


def _open_embedder(args: argparse.Namespace, expected_dimension: int | None = None):
    """A LocalEmbedder (--model) or an EmbeddingClient (--server), and the model fingerprint if known."""
    from street2shop.errors import ConfigError

    if bool(args.model) == bool(args.server):
        raise ConfigError("give exactly one of --model EXPORT_DIR (embed in this process) or --server HOST:PORT (TF Serving). "
                          f"Received: model={args.model!r}, server={args.server!r}")
    if args.model:
        from street2shop.export import LocalEmbedder

        embedder = LocalEmbedder(args.model, batch_size=args.batch_size)
        return embedder, embedder.fingerprint
    from street2shop.serving.client import EmbeddingClient

    client = EmbeddingClient(args.server, args.model_name, expected_dimension=expected_dimension, batch_size=args.batch_size)
    return client, None


def _add_embedder_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="exported model: an export base or version folder (embeds in this process)")
    p.add_argument("--server", default="", help="TF Serving gRPC address HOST:PORT (instead of --model)")
    p.add_argument("--model-name", default="street2shop", help="model name on the server")
    p.add_argument("--batch-size", type=int, default=32, help="images per request")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def _shop_records(manifest: str, split: str):
    """Shop records of a manifest, or every image of a folder (product id = file name without suffix)."""
    from pathlib import Path

    from street2shop.data.records import Record, read_manifest
    from street2shop.errors import DataError

    folder = Path(manifest)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
        return [Record(str(p.resolve()), p.stem, "shop", "catalog") for p in files]
    records = read_manifest(manifest)
    splits = {s for s in split.split(",") if s}
    return [r for r in records if r.domain == "shop" and (not splits or r.split in splits)]


def cmd_embed(args: argparse.Namespace) -> int:
    from street2shop.embed import embed_catalog

    records = _shop_records(args.manifest, args.split)
    embedder, fingerprint = _open_embedder(args)
    result = embed_catalog(records, embedder, args.out, chunk_size=args.chunk_size, batch_size=args.batch_size,
                           in_flight=args.in_flight, crop_to_box=not args.no_crop, progress=not args.json,
                           fingerprint=fingerprint or args.fingerprint or None)
    summary = {"out": args.out, "embedded": len(result.items), "skipped": len(result.skipped), "resumed_chunks": result.resumed_chunks}
    _print_json(summary) if args.json else print(f"embedded {summary['embedded']} images ({summary['skipped']} skipped) into {args.out}")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from street2shop.embed import load_embeddings
    from street2shop.index import CatalogIndex, Item

    embeddings, items, summary = load_embeddings(args.embeddings)
    kwargs = {k: v for k, v in (("n_trees", args.n_trees), ("search_k", args.search_k)) if v is not None}
    index = CatalogIndex(int(summary["dimension"]), model_fingerprint=summary.get("fingerprint") or None, **kwargs)
    index.add(embeddings, [Item(it["product_id"], it["image_path"], it.get("category")) for it in items])
    index.build()
    path = index.save(args.out)
    _print_json({"index": str(path), **index.config()}) if args.json else print(f"built index of {len(index)} images at {path}")
    return 0


def _parse_box(text: str) -> tuple[float, float, float, float]:
    from street2shop.errors import ConfigError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ConfigError(f"--box must be LEFT,TOP,WIDTH,HEIGHT in pixels. Received: --box {text!r}")
    return values  # type: ignore[return-value]


def cmd_search(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from street2shop.data.records import Box, Record
    from street2shop.embed import normalized_box
    from street2shop.errors import ConfigError, DataError
    from street2shop.index import CatalogIndex

    manifest = CatalogIndex.read_manifest(args.index)
    embedder, fingerprint = _open_embedder(args, expected_dimension=int(manifest["dimension"]))
    index = CatalogIndex.load(args.index, expected_fingerprint=fingerprint, expected_dimension=getattr(embedder, "dimension", None))
    boxes = [_parse_box(b) for b in (args.box or [])]
    if boxes and len(boxes) != len(args.photos):
        raise ConfigError(f"give one --box per photo or none. Received: {len(args.photos)} photos, {len(boxes)} boxes")
    answers = {}
    for i, photo in enumerate(args.photos):
        path = Path(photo)
        if not path.is_file():
            raise DataError(f"photo not found: {photo}")
        box = None
        if boxes:
            try:
                box = normalized_box(Record(str(path), "query", "street", "query", box=Box(*boxes[i])))
            except ValueError as e:
                raise ConfigError(f"bad --box for {photo}: {e}") from None
            except OSError as e:
                raise DataError(f"cannot read {photo}: {e}") from None
        vector = embedder.embed([path.read_bytes()], None if box is None else np.array([box], np.float32))[0]
        answers[photo] = index.query(vector, k=args.k)
    if args.json:
        _print_json({p: [dataclasses.asdict(r) for r in rs] for p, rs in answers.items()})
    else:
        for photo, results in answers.items():
            print(photo)
            for r in results:
                print(f"  {r.rank:>3}. {r.product_id:<24} {r.similarity:6.3f}  {r.image_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from street2shop.data.records import read_manifest
    from street2shop.errors import DataError
    from street2shop.evaluate import evaluate_queries
    from street2shop.index import CatalogIndex
    from street2shop.report import headline, write_report

    index_manifest = CatalogIndex.read_manifest(args.index)
    embedder, fingerprint = _open_embedder(args, expected_dimension=int(index_manifest["dimension"]))
    index = CatalogIndex.load(args.index, expected_fingerprint=fingerprint, expected_dimension=getattr(embedder, "dimension", None))
    queries = [r for r in read_manifest(args.manifest) if r.domain == "street" and r.split == args.split]
    if not queries:
        raise DataError(f"no street photo of split {args.split!r} in {args.manifest}")
    evaluation = evaluate_queries(queries, embedder, index, by_category=args.by_category, exact=args.exact,
                                  batch_size=args.batch_size, progress=not args.json)
    paths = write_report({args.name: evaluation}, args.out, config={k: v for k, v in vars(args).items() if k != "func"})
    if args.json:
        _print_json({"report": {k: str(v) for k, v in paths.items()}, "skipped": evaluation.skipped, **evaluation.metrics})
    else:
        print(f"{args.name}: {headline(evaluation)}")
        if evaluation.skipped:
            print(f"skipped {len(evaluation.skipped)} unreadable query images (listed in the log)")
        print(f"report: {paths['html']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from street2shop.demo import DemoConfig, run_demo

    fields = {f.name for f in dataclasses.fields(DemoConfig)} - {"verbose"}
    config = DemoConfig(**{k: v for k, v in vars(args).items() if k in fields}, verbose=0 if args.json else 2)
    summary = run_demo(config)
    if args.json:
        _print_json(summary)
    else:
        print(f"\ntrained tower:   {summary['trained']}")
        print(f"untrained tower: {summary['untrained']}")
        print(f"report: {summary['report']['html']} (also {summary['report']['markdown']}, report.json, topk.png)")
    return 0


# --------------------------------------------------------------------------- parser


DEMO_HELP = {
    "workdir": "folder for everything the demo writes (data, run, exports, indexes, report)",
    "data": "a manifest to use instead of the generated dataset",
    "eval_split": "split of the street photos used as queries",
    "products": "products in the generated dataset",
    "street_per_product": "street photos per generated product",
    "seed": "seed of the dataset, the weights and the pairs",
    "backbone": "tower backbone",
    "image_size": "tower input size (InceptionV3 needs >= 75)",
    "embedding_dim": "embedding dimension",
    "weights": "'none' (from scratch) or 'imagenet' (needs the internet once) or a weights file",
    "epochs": "training epochs",
    "pairs_per_epoch": "training pairs per epoch",
    "batch_size": "training batch size",
    "learning_rate": "AdamW learning rate",
    "bn_momentum": "BatchNorm momentum of the backbone (0.9 suits short runs from scratch)",
    "by_category": "search only the query's category",
    "model_name": "model name the stand-in server answers to",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="street2shop",
        description="Find the exact product in a shop catalogue from a customer's photo.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"street2shop {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_argument("--debug", action="store_true", help="show tracebacks for expected errors too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(parent, name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text, parents=[common], formatter_class=_Formatter)
        p.set_defaults(func=func)
        return p

    data = sub.add_parser("data", help="prepare datasets: synthesise, import, check", formatter_class=_Formatter)
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = command(data_sub, "synth", cmd_data_synth, "generate a synthetic street/shop dataset (JPEGs + manifest.csv)")
    p.add_argument("out", help="output folder")
    p.add_argument("--products", type=int, default=40, help="number of products")
    p.add_argument("--street-per-product", type=int, default=8, help="street photos per product")
    p.add_argument("--shop-per-product", type=int, default=1, help="shop photos per product")
    p.add_argument("--image-size", type=int, default=160, help="side of the generated images in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")

    p = command(data_sub, "import-street2shop", cmd_data_import_street2shop, "convert the Exact Street2Shop layout (meta/json + photos) to a manifest")
    p.add_argument("root", help="dataset root holding meta/json/ and photos/")
    p.add_argument("-o", "--output", required=True, help="manifest CSV to write")
    p.add_argument("--categories", default="", help="comma-separated categories to import (default: all present)")
    p.add_argument("--strict", action="store_true", help="fail on photos missing on disk instead of skipping them")

    p = command(data_sub, "check", cmd_data_check, "read a manifest and decode every image: report missing, unreadable and empty-box images")
    p.add_argument("manifest", help="manifest CSV")
    p.add_argument("--strict", action="store_true", help="fail on the first missing image")

    p = command(sub, "train", cmd_train, "train the siamese model with model.fit (robust contrastive loss, optional multi-task)")
    _add_config_flags(p)

    p = command(sub, "export", cmd_export, "export the embedding tower of a checkpoint as a versioned SavedModel for TF Serving")
    p.add_argument("checkpoint", help=".keras checkpoint (siamese model or tower)")
    p.add_argument("export_base", help="TF Serving model base path; the version goes in a numbered subfolder")
    p.add_argument("--version", type=int, default=None, help="version number (default: next free; never overwrites)")
    p.add_argument("--model-name", default="street2shop", help="model name used in the warm-up requests")

    p = command(sub, "serve", cmd_serve, "run the local STAND-IN for TF Serving (gRPC Predict/GetModelMetadata/GetModelStatus) for development and tests")
    p.add_argument("export_base", help="export base path (the newest version is served)")
    p.add_argument("--port", type=int, default=8500, help="gRPC port")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--model-name", default="street2shop", help="model name to answer to")
    p.add_argument("--max-batch-size", type=int, default=256, help="largest batch accepted")

    p = command(sub, "embed", cmd_embed, "embed the shop images of a manifest (resumable), locally or over gRPC")
    p.add_argument("manifest", help="manifest CSV, or a folder of catalogue images (product id = file name)")
    p.add_argument("--out", required=True, help="output folder (embeddings.npy, items.jsonl; chunks for resuming)")
    p.add_argument("--split", default="", help="only shop images of these comma-separated splits (default: all shop images)")
    _add_embedder_flags(p)
    p.add_argument("--in-flight", type=int, default=2, help="requests in flight at once")
    p.add_argument("--chunk-size", type=int, default=256, help="images per saved chunk (the unit of resuming)")
    p.add_argument("--no-crop", action="store_true", help="ignore boxes of shop images")
    p.add_argument("--fingerprint", default="", help="model fingerprint to record when embedding over --server")

    index = sub.add_parser("index", help="build Annoy indexes", formatter_class=_Formatter)
    index_sub = index.add_subparsers(dest="index_command", metavar="INDEX_COMMAND", required=True)
    p = command(index_sub, "build", cmd_index_build, "build an Annoy index from an embed output folder")
    p.add_argument("embeddings", help="output folder of `street2shop embed`")
    p.add_argument("--out", required=True, help="index folder to write (atomically replaced)")
    p.add_argument("--n-trees", type=int, default=None, help="Annoy trees (default: the index's)")
    p.add_argument("--search-k", type=int, default=None, help="Annoy search_k (default: the index's)")

    p = command(sub, "search", cmd_search, "find the products in customer photos")
    p.add_argument("photos", nargs="+", help="photo files")
    p.add_argument("--index", required=True, help="index folder")
    _add_embedder_flags(p)
    p.add_argument("--box", action="append", help="LEFT,TOP,WIDTH,HEIGHT in pixels, once per photo")
    p.add_argument("-k", type=int, default=20, help="number of products")

    p = command(sub, "evaluate", cmd_evaluate, "top-k accuracy, recall@k, mAP, MRR of street photos against the indexed catalogue")
    p.add_argument("manifest", help="manifest CSV with the street photos")
    p.add_argument("--index", required=True, help="index folder of the catalogue")
    _add_embedder_flags(p)
    p.add_argument("--split", default="val", help="split of the street photos used as queries (Exact Street2Shop: test)")
    p.add_argument("--exact", action="store_true", help="exact search over the index's vectors instead of Annoy")
    p.add_argument("--by-category", action=argparse.BooleanOptionalAction, default=True,
                   help="search only the query's category (the Exact Street2Shop protocol)")
    p.add_argument("--out", default="report", help="report folder")
    p.add_argument("--name", default="model", help="name of this run in the report")

    p = command(sub, "demo", cmd_demo, "the whole pipeline end to end on a generated dataset (or --data)")
    from street2shop.demo import DemoConfig

    for field in dataclasses.fields(DemoConfig):
        if field.name == "verbose":
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            p.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default,
                           help=DEMO_HELP.get(field.name))
        else:
            p.add_argument(flag, dest=field.name, type=type(field.default), default=field.default,
                           help=DEMO_HELP.get(field.name))
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("street2shop").setLevel(logging.INFO if verbosity <= 1 else logging.DEBUG)
    if verbosity < 2:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``street2shop`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", 0))
    try:
        return int(args.func(args) or 0)
    except Street2ShopError as e:
        if getattr(args, "debug", False):
            raise
        print(f"street2shop: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission problem: one line, not a traceback
        if getattr(args, "debug", False):
            raise
        print(f"street2shop: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("street2shop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
