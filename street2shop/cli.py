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
from collections.abc import Callable, Collection, Sequence
from typing import Any

from street2shop import __version__
from street2shop.contract import DEFAULT_MODEL_NAME  # imports no TensorFlow
from street2shop.errors import Street2ShopError
from street2shop.model.precision import PRECISIONS  # imports no TensorFlow
from street2shop.model.views import TTA_MODES  # imports no TensorFlow

logger = logging.getLogger("street2shop")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Adds "(default: ...)" to a flag's help unless the help already says it, or there is nothing to say (None, '', off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default:" in text or action.default is None or action.default is False or action.default == "":
            return text
        return super()._get_help_string(action)


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
    from street2shop.data.records import check_dataset

    check = check_dataset(args.manifest, strict=args.strict)
    if args.json:
        _print_json(check.to_dict())
    else:
        print(check.records.summary())
        print(check.images.summary())
        for path, error in check.images.bad_images.items():
            print(f"  unreadable: {path}: {error}")
    return 0


# --------------------------------------------------------------------------- train / export / serve


def add_dataclass_flags(parser: Any, kind: type, *, defaults: Any = None, skip: Collection[str] = (), only_given: bool = False) -> None:
    """A flag per field of config dataclass ``kind`` with a help text (``--image-size`` for ``image_size``): a new setting is one field.

    Type, default and help are the field's (:func:`street2shop.config.setting`); a field without a default is a
    required flag, a bool one ``--x/--no-x``. ``defaults``: an instance whose values are the defaults shown.
    ``only_given``: the flag is in the namespace only when given (it overrides a config file).
    """
    from street2shop.config import field_types

    for field, kind_of in zip(dataclasses.fields(kind), field_types(kind).values()):
        if field.name in skip or "help" not in field.metadata:
            continue
        default = getattr(defaults, field.name) if defaults is not None else field.default
        kwargs: dict[str, Any] = {"dest": field.name, "help": field.metadata["help"], "default": default}
        if kind_of is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:  # int, float or str
            kwargs.update(type=kind_of, metavar=field.name.upper())
        if default is dataclasses.MISSING:
            kwargs.update(required=True, default=None)
        elif only_given:
            kwargs.update(default=argparse.SUPPRESS, help=f"{kwargs['help']} (default: {default!r})")
        parser.add_argument("--" + field.name.replace("_", "-"), **kwargs)


def config_of(kind: type, args: argparse.Namespace, **values: Any) -> Any:
    """An instance of config dataclass ``kind`` from the parsed flags of its fields (and ``values``)."""
    names = {f.name for f in dataclasses.fields(kind)} - set(values)
    return kind(**{k: v for k, v in vars(args).items() if k in names}, **values)


def _add_config_flags(parser: argparse.ArgumentParser, defaults: Any = None, skip: frozenset[str] = frozenset()) -> None:
    """``--config`` and a flag per training config field, by section, each overriding the file when given."""
    from street2shop.config import TrainConfig

    defaults = defaults or TrainConfig()
    parser.add_argument("--config", help="TOML or JSON config file; flags given here override it")
    for section, kind in TrainConfig.SECTIONS.items():
        add_dataclass_flags(parser.add_argument_group(f"[{section}]"), kind, defaults=getattr(defaults, section), skip=skip, only_given=True)


def _resolve_train_config(args: argparse.Namespace, defaults: Any = None):
    from street2shop.config import TrainConfig, field_owners, load_config

    config = load_config(args.config) if args.config else (defaults or TrainConfig())
    overrides = {k: v for k, v in vars(args).items() if k in field_owners()}
    return config.replace(**overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from street2shop.train import train

    config = _resolve_train_config(args)
    result = train(config, verbose=0 if args.json else "auto")
    summary = {
        "output_dir": str(result.output_dir), "best_checkpoint": str(result.best_checkpoint),
        "last_checkpoint": str(result.last_checkpoint), "epochs_run": len(next(iter(result.history.values()), [])),
        "seconds": round(result.seconds, 1), "pairs_per_second": round(result.pairs_per_second, 2),
        "final": {k: v[-1] for k, v in result.history.items() if v},
    }
    _print_json(summary) if args.json else print(f"best checkpoint: {result.best_checkpoint}\nlast checkpoint: {result.last_checkpoint}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from street2shop.export import export_checkpoint

    card = export_checkpoint(args.checkpoint, args.export_base, version=args.version, model_name=args.model_name, tta=args.tta,
                             precision=args.precision)
    tta = "" if card.get("tta", "none") == "none" else f", test-time augmentation {card['tta']}"
    precision = "" if card.get("precision", "float32") == "float32" else f", computing in {card['precision']}"
    _print_json(card) if args.json else print(f"exported {card['path']} (version {card['version']}, dimension {card['dimension']}, "
                                              f"fingerprint {card['fingerprint']}{tta}{precision})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from street2shop.serving.server import serve

    serve(args.export_base, port=args.port, host=args.host, model_name=args.model_name,
          max_batch_size=args.max_batch_size)
    return 0


# --------------------------------------------------------------------------- embed / index / search / evaluate / demo


def _add_embedder_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="exported model: an export base or version folder (embeds in this process)")
    p.add_argument("--server", default="", help="TF Serving gRPC address HOST:PORT (instead of --model)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="model name on the server")
    p.add_argument("--batch-size", type=int, default=32, help="images per request")


def _add_reference_flags(p: argparse.ArgumentParser) -> None:
    """Which photos of the manifest become references (embed, beam-embed): data.records.is_catalogue's settings."""
    p.add_argument("--split", default="", help="only shop images of these comma-separated splits (default: all shop images)")
    p.add_argument("--domains", default="shop", help="the photos to index as references: shop (the catalogue), or shop,street to add "
                   "labelled customer photos as references of their products (street alone: customer photos only, e.g. for index update)")
    p.add_argument("--reference-splits", default="train", help="with --domains ...street: only street photos of these comma-separated "
                   "splits (keep the photos you evaluate with out of the index)")


def _references(counts: dict[str, int]) -> str:
    """`` (81 catalogue photos, 2640 customer photos)`` when there are customer photos, else nothing."""
    return f" ({counts['shop']} catalogue photos, {counts['street']} customer photos)" if counts.get("street") else ""


def cmd_embed(args: argparse.Namespace) -> int:
    from street2shop.embed import embed_source
    from street2shop.items import domain_counts

    result = embed_source(
        args.manifest, args.out, split=args.split, domains=args.domains, reference_splits=args.reference_splits,
        model=args.model or None, server=args.server or None,
        model_name=args.model_name, batch_size=args.batch_size, chunk_size=args.chunk_size, in_flight=args.in_flight,
        crop_to_box=not args.no_crop, progress=not args.json,
    )
    summary = {"out": args.out, "embedded": len(result.items), "references": domain_counts(result.items), "skipped": len(result.skipped),
               "resumed_chunks": result.resumed_chunks, "model": result.identity.to_dict()}
    if args.json:
        _print_json(summary)
    else:
        print(f"embedded {summary['embedded']} images{_references(summary['references'])} ({summary['skipped']} skipped) "
              f"with {result.identity} into {args.out}")
    return 0


def cmd_beam_embed(args: argparse.Namespace) -> int:
    try:
        from street2shop.beam_embed import beam_embed
    except ModuleNotFoundError as e:
        if e.name != "apache_beam":
            raise
        from street2shop.errors import ConfigError

        raise ConfigError("beam-embed needs Apache Beam: pip install 'street2shop[beam]'. Received: no module apache_beam") from None
    stray = [flag for flag, value in (("--index-type", args.index_type), ("--keep", args.keep)) if value is not None]
    if stray and not args.to_milvus:
        from street2shop.errors import ConfigError

        raise ConfigError(f"{', '.join(stray)} belong(s) to --to-milvus, which was not given. Received: {' '.join(stray)}")

    result = beam_embed(
        args.manifest, args.out, model=args.model, split=args.split, domains=args.domains, reference_splits=args.reference_splits,
        batch_size=args.batch_size,
        min_batch_size=args.min_batch_size, shard_rows=args.shard_rows, crop_to_box=not args.no_crop,
        decode_check=args.decode_check, runner=args.runner, pipeline_args=args.pipeline_args,
        quiet_workers=getattr(args, "verbose", 0) < 2,  # as main() keeps this process's quiet unless -vv
        to_milvus=args.to_milvus or None, **_milvus_settings(args),
    )
    summary = {"out": result.out, "run": result.run, "shards": len(result.shards), "embedded": result.embedded,
               "references": result.references, "dead_letter": result.dead_letter, "replaced": result.replaced,
               "seconds": round(result.seconds, 1), "model": result.identity.to_dict(), "milvus": result.milvus}
    if args.json:
        _print_json(summary)
    else:
        print(f"embedded {result.embedded} images{_references(result.references)} ({result.dead_letter} in the dead letter) with {result.identity} "
              f"into {len(result.shards)} shards of {result.out}")
        if result.milvus:
            print(f"published Milvus index version {result.milvus['version']} ({result.milvus['collection']}, {result.milvus['count']} images); "
                  f"search it with --index {result.milvus['index']}")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from street2shop.errors import ConfigError

    local = {"--out": args.out, "--kind": args.kind != "annoy", "--n-trees": args.n_trees is not None, "--search-k": args.search_k is not None}
    milvus = {"--uri": args.uri, "--collection": args.collection, "--index-params": args.index_params, "--search-params": args.search_params,
              "--index-type": args.index_type is not None, "--keep": args.keep is not None}
    other = [flag for flag, given in (local if args.backend == "milvus" else milvus).items() if given]
    if other:
        raise ConfigError(f"{', '.join(other)} belong(s) to the {'local' if args.backend == 'milvus' else 'milvus'} backend, not "
                          f"--backend {args.backend}. Received: {' '.join(other)}")
    if args.backend == "milvus":
        return _milvus_build(args)
    if not args.out:
        raise ConfigError("give the index base: --out INDEX_BASE (or --backend milvus --uri URI). Received: no --out")
    from street2shop.index.build import build_index

    built = build_index(args.embeddings, args.out, kind=args.kind, n_trees=args.n_trees, search_k=args.search_k)
    _print_json(built) if args.json else print(f"built {built['kind']} index version {built['version']} of {built['count']} images of model {built['model_fingerprint']} at {built['index']}")
    return 0


def _json_flag(name: str, text: str) -> dict[str, Any]:
    from street2shop.errors import ConfigError

    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"--{name} must be a JSON object like '{{\"M\": 32}}'. Received: {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--{name} must be a JSON object like '{{\"M\": 32}}'. Received: {text!r}")
    return value


def _milvus_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``--index-type`` and ``--keep`` where given (the library's defaults otherwise)."""
    return {k: v for k, v in (("index_type", args.index_type), ("keep", args.keep)) if v is not None}


def _milvus_build(args: argparse.Namespace) -> int:
    from street2shop.errors import ConfigError
    from street2shop.index.milvus_write import build_milvus

    if not args.uri:
        raise ConfigError("--backend milvus needs --uri: a Milvus Lite file (catalogue.db) or http://host:19530. Received: no --uri")
    built = build_milvus(args.embeddings, args.uri, name=args.collection or None, **_milvus_settings(args),
                         index_params=_json_flag("index-params", args.index_params),
                         search_params=_json_flag("search-params", args.search_params), progress=not args.json)
    if args.json:
        _print_json(built)
    else:
        print(f"built Milvus index version {built['version']} ({built['collection']}, {built['index_type']}) of {built['count']} images "
              f"of model {built['model_fingerprint']}; search it with --index {built['index']}")
    return 0


def cmd_index_update(args: argparse.Namespace) -> int:
    from street2shop.index.milvus import is_milvus

    if is_milvus(args.index_base):
        from street2shop.index.milvus_write import update_milvus

        if args.auto_compact:
            from street2shop.errors import ConfigError

            raise ConfigError("a Milvus index is updated in place and never compacted by street2shop (Milvus compacts its segments "
                              "itself); leave out --auto-compact. Received: --auto-compact")
        result = update_milvus(args.index_base, add=args.add or (), remove=args.remove or None)
        _print_json(result) if args.json else print(
            f"{result['index']} version {result['version']} ({result['collection']}) updated in place: {result['added']} images added "
            f"({result['replaced']} replacing), {result['removed']['rows']} removed; {result['live_count']} in the catalogue. "
            f"Every reader sees it within Milvus's Bounded staleness (5 s by default)")
        return 0
    from street2shop.index.updates import update_index

    result = update_index(args.index_base, add=args.add or (), remove=args.remove or None, auto_compact=args.auto_compact)
    if args.json:
        _print_json(result)
    else:
        print(f"index version {result['version']}: {result['added']} images added ({result['replaced']} replacing), "
              f"{result['removed']['rows']} removed; {result['live_count']} in the catalogue "
              f"(base {result['base_count']} - {result['removed_from_base']} removed, delta {result['delta_count']}) at {result['index']}")
        print(result["compaction"]["reason"])
        if "compacted" in result:
            print(f"compacted into version {result['compacted']['version']} ({result['compacted']['count']} images) at {result['compacted']['index']}")
    return 0


def cmd_index_compact(args: argparse.Namespace) -> int:
    from street2shop.index.milvus import is_milvus

    if is_milvus(args.index_base):
        from street2shop.errors import ConfigError

        raise ConfigError("a Milvus index needs no compaction: updates are applied in place and Milvus compacts its segments "
                          f"itself. Received: {args.index_base}")
    from street2shop.index.updates import compact_index

    result = compact_index(args.index_base, n_trees=args.n_trees, search_k=args.search_k)
    _print_json(result) if args.json else print(f"compacted version {result['from_version']} into version {result['version']} "
                                                f"({result['count']} images) at {result['index']}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from street2shop.search import search_photos

    answers = search_photos(
        args.photos, index=args.index, model=args.model or None, server=args.server or None, model_name=args.model_name,
        boxes=args.box, k=args.k, category=args.category or None, batch_size=args.batch_size,
    )
    def shown(answer: Any, r: Any) -> str | None:  # the product's catalogue photo, whatever image matched
        photo = answer.catalogue_photo(r)
        return photo.image_path if photo is not None else None

    if args.json:
        _print_json({a.photo: ([{**dataclasses.asdict(r), "catalogue_image": shown(a, r)} for r in a.results] if a.error is None
                               else {"error": a.error}) for a in answers})
    else:
        for answer in answers:
            print(answer.photo)
            if answer.error is not None:
                print(f"  error: {answer.error}")
            for r in answer.results:
                matched = f"  (matched a customer photo: {r.image_path})" if r.domain == "street" else ""
                print(f"  {r.rank:>3}. {r.product_id:<24} {r.similarity:6.3f}  {shown(answer, r) or '(no catalogue photo)'}{matched}")
    return 0 if all(a.error is None for a in answers) else 1


def cmd_service(args: argparse.Namespace) -> int:
    from street2shop.service import serve_http
    from street2shop.service.config import ServiceConfig

    serve_http(config_of(ServiceConfig, args))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from street2shop.evaluate import evaluate_manifest
    from street2shop.report import headline

    evaluation, paths = evaluate_manifest(
        args.manifest, index=args.index, split=args.split, model=args.model or None, server=args.server or None,
        model_name=args.model_name, batch_size=args.batch_size, by_category=args.by_category, exact=args.exact,
        out=args.out, name=args.name, label_column=args.label_column, progress=not args.json,
        config={k: v for k, v in vars(args).items() if k != "func"},
    )
    if args.json:
        _print_json({"report": {k: str(v) for k, v in paths.items()}, "searched": evaluation.searched, "by_category": evaluation.by_category,
                     "skipped": evaluation.skipped, **evaluation.metrics})
    else:
        print(f"{args.name}: {headline(evaluation)}")
        if evaluation.skipped:
            print(f"skipped {len(evaluation.skipped)} unreadable query images (listed in the log)")
        print(f"report: {paths['html']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from street2shop.demo import DEMO_TRAINING, DemoConfig, run_demo

    config = config_of(DemoConfig, args, verbose=0 if args.json else "auto", train=_resolve_train_config(args, DEMO_TRAINING))
    summary = run_demo(config)
    if args.json:
        _print_json(summary)
    else:
        print(f"\ntrained tower:   {summary['trained']}")
        print(f"untrained tower: {summary['untrained']}")
        print(f"report: {summary['report']['html']} (also {summary['report']['markdown']}, report.json, topk.png)")
        work = config.workdir
        print(f"\nsearch it in a browser (pip install 'street2shop[service]'; make demo installed it):\n"
              f"  street2shop service --index {work}/index-trained --model {work}/exports   # then open http://127.0.0.1:8080/\n"
              f"or through a model server:\n"
              f"  street2shop serve {work}/exports --port 8500 &\n"
              f"  street2shop service --index {work}/index-trained --server localhost:8500")
    return 0


# --------------------------------------------------------------------------- parser


def _add_milvus_build_flags(p: argparse.ArgumentParser, *, beam: bool = False) -> None:
    """The flags of a build into Milvus (``index build --backend milvus``; ``beam-embed --to-milvus``). The token: MILVUS_TOKEN, never a flag.

    Their defaults are the library's (``index.milvus_write``, which checks the values), so parsing imports no index code.
    """
    group = p.add_argument_group("Milvus (the token of a server comes from the MILVUS_TOKEN environment variable)")
    if not beam:
        group.add_argument("--backend", choices=("local", "milvus"), default="local",
                           help="local: an index base (--out, --kind); milvus: a new version of a Milvus index (--uri, --collection)")
        group.add_argument("--uri", default="", help="Milvus: a Milvus Lite file (catalogue.db: embedded, nothing to start) or http(s)://host:19530")
        group.add_argument("--collection", default="", help="Milvus: the index's name, the alias of its live version (default: street2shop)")
        group.add_argument("--index-params", default="", help="Milvus: the vector index's build parameters as JSON, e.g. '{\"M\": 32}'")
        group.add_argument("--search-params", default="", help="Milvus: its search parameters as JSON, e.g. '{\"ef\": 256}'")
    group.add_argument("--index-type", default=None, metavar="TYPE",
                       help="Milvus: the vector index, HNSW (the default), FLAT, IVF_FLAT, IVF_SQ8 or IVF_PQ (not on Milvus Lite)")
    group.add_argument("--keep", type=int, default=None, help="Milvus: versions kept, the live one included (at least 2; default 2)")


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
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="model name used in the warm-up requests")
    p.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="test-time augmentation in every signature: the mean of the image and its mirror (flip; 2 tower passes), "
                        "and of their central crops (flip-crops; 4 passes); embed catalogue and queries with the same export")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="dtype policy the exported tower computes in, whatever trained it (float32 in and out in every one): "
                        "float32, or mixed_bfloat16 / mixed_float16 for serving hardware that runs them faster (see README, 'On a GPU'); "
                        "a mixed export is another model (fingerprint)")

    p = command(sub, "serve", cmd_serve, "run the local STAND-IN for TF Serving (gRPC Predict/GetModelMetadata/GetModelStatus) for development and tests")
    p.add_argument("export_base", help="export base path (the newest version is served)")
    p.add_argument("--port", type=int, default=8500, help="gRPC port")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="model name to answer to")
    p.add_argument("--max-batch-size", type=int, default=256, help="largest batch accepted")

    p = command(sub, "embed", cmd_embed, "embed the shop images of a manifest (and, if asked, labelled customer photos) as references (resumable), locally or over gRPC")
    p.add_argument("manifest", help="manifest CSV, or a folder of catalogue images (product id = file name)")
    p.add_argument("--out", required=True, help="output folder (embeddings.npy, items.jsonl; chunks for resuming)")
    _add_reference_flags(p)
    _add_embedder_flags(p)
    p.add_argument("--in-flight", type=int, default=2, help="requests in flight at once")
    p.add_argument("--chunk-size", type=int, default=256, help="images per saved chunk (the unit of resuming)")
    p.add_argument("--no-crop", action="store_true", help="ignore the images' boxes")

    p = command(sub, "beam-embed", cmd_beam_embed, "embed the shop images of a manifest (or a glob of shards) on Apache Beam "
                "(RunInference) into sharded embeddings; needs street2shop[beam]")
    p.epilog = ("Any other option is a Beam pipeline option, passed on: --direct_running_mode multi_processing "
                "--direct_num_workers 2 (local worker processes); --project, --region, --temp_location (Dataflow); "
                "--flink_master, --environment_type (Flink). See README.md, 'Catalogues beyond one machine'.")
    p.add_argument("manifest", help="manifest CSV, or a glob of manifest shards (local, gs://, s3://)")
    p.add_argument("--out", required=True, help="output folder: shards.json and the run's shards (a re-run replaces it whole)")
    p.add_argument("--model", required=True, help="an export base (its newest version) or version folder; remote: the version folder")
    _add_reference_flags(p)
    p.add_argument("--batch-size", type=int, default=32, help="most images per model call")
    p.add_argument("--min-batch-size", type=int, default=None, help="fewest images per model call (default: --batch-size)")
    p.add_argument("--shard-rows", type=int, default=100_000, help="manifest lines per output shard (an embeddings folder)")
    p.add_argument("--no-crop", action="store_true", help="ignore the images' boxes")
    p.add_argument("--decode-check", action="store_true", help="decode each image before the model (catches truncated files earlier)")
    p.add_argument("--runner", default="DirectRunner",
                   help="Beam runner; DirectRunner runs Beam's FnApiRunner (never Prism, which downloads a binary)")
    p.add_argument("--to-milvus", default="", help="also write the catalogue from the workers into the next version of the Milvus "
                                                   "index milvus:URI#NAME (published when the run is)")
    _add_milvus_build_flags(p, beam=True)
    p.set_defaults(pipeline_args=[])

    index = sub.add_parser("index", help="build Annoy indexes", formatter_class=_Formatter)
    index_sub = index.add_subparsers(dest="index_command", metavar="INDEX_COMMAND", required=True)
    p = command(index_sub, "build", cmd_index_build, "build an index from embed output folders (all of one model)")
    p.add_argument("embeddings", nargs="+", help="output folder(s) of `street2shop embed`")
    p.add_argument("--out", default="", help="index base: the index becomes its next numbered version (OUT/1/, OUT/2/, ...), written atomically")
    p.add_argument("--kind", choices=("annoy", "exact"), default="annoy", help="Annoy (approximate, fast at scale) or exact search")
    p.add_argument("--n-trees", type=int, default=None, help="Annoy trees (default: the index's)")
    p.add_argument("--search-k", type=int, default=None, help="Annoy search_k (default: the index's)")
    _add_milvus_build_flags(p)

    p = command(index_sub, "update", cmd_index_update, "add and remove catalogue images without a rebuild: the next version is the base, a delta and tombstones")
    p.add_argument("index_base", help="index base to update (its newest version is the starting point), or a Milvus index "
                                      "milvus:URI#NAME (updated in place)")
    p.add_argument("--add", action="append", help="embeddings folder of new or changed images (same model as the index); repeatable")
    p.add_argument("--remove", default="", help="file of product ids, image ids or image paths to remove, one per line")
    p.add_argument("--auto-compact", action="store_true", help="also rebuild one Annoy version when that pays (the update says when)")

    p = command(index_sub, "compact", cmd_index_compact, "rebuild one clean Annoy version from base + delta - tombstones")
    p.add_argument("index_base", help="index base to compact (its newest version)")
    p.add_argument("--n-trees", type=int, default=None, help="Annoy trees (default: the base's)")
    p.add_argument("--search-k", type=int, default=None, help="Annoy search_k (default: the base's)")

    p = command(sub, "search", cmd_search, "find the products in customer photos")
    p.add_argument("photos", nargs="+", help="photo files")
    p.add_argument("--index", required=True, help="index base (its newest version is used), index folder, or Milvus index milvus:URI#NAME")
    _add_embedder_flags(p)
    p.add_argument("--box", action="append", help="LEFT,TOP,WIDTH,HEIGHT in pixels, once per photo")
    p.add_argument("-k", type=int, default=20, help="number of products")
    p.add_argument("--category", default="", help="search only this category")

    p = command(sub, "service", cmd_service, "the search service: an HTTP API and a web page over TF Serving (or --model) and an index base, swapped live")
    p.epilog = "Every flag can be given as an environment variable instead: STREET2SHOP_ and its name (STREET2SHOP_INDEX, STREET2SHOP_MAX_UPLOAD_MB, ...); a flag wins."
    from street2shop.service.config import ServiceConfig, environment_settings  # imports no FastAPI

    add_dataclass_flags(p, ServiceConfig)
    p.set_defaults(**environment_settings(os.environ))  # STREET2SHOP_INDEX etc.: the flags' defaults, so a flag wins

    p = command(sub, "evaluate", cmd_evaluate, "top-k accuracy, recall@k, mAP, MRR of street photos against the indexed catalogue")
    p.add_argument("manifest", help="manifest CSV with the street photos")
    p.add_argument("--index", required=True, help="index base (its newest version is used), index folder, or Milvus index milvus:URI#NAME of the catalogue")
    _add_embedder_flags(p)
    p.add_argument("--split", default="val", help="split of the street photos used as queries (Exact Street2Shop: test)")
    p.add_argument("--exact", action="store_true", help="exact search over the index's vectors instead of Annoy")
    p.add_argument("--by-category", action=argparse.BooleanOptionalAction, default=False,
                   help="search only the query's category (the Exact Street2Shop protocol; easier) instead of the whole catalogue")
    p.add_argument("--out", default="report", help="report folder")
    p.add_argument("--name", default="model", help="name of this run in the report")
    p.add_argument("--label-column", default=None,
                   help="manifest column that names products in the report (default: product_name when there is one; '' for ids)")

    p = command(sub, "demo", cmd_demo, "the whole pipeline end to end on a generated dataset (or --data)")
    from street2shop.demo import DEMO_SETS, DEMO_TRAINING, DemoConfig

    add_dataclass_flags(p, DemoConfig)
    _add_config_flags(p, DEMO_TRAINING, skip=DEMO_SETS)
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("street2shop").setLevel(logging.INFO if verbosity <= 1 else logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``street2shop`` console script."""
    from street2shop.console import quiet_tensorflow, uninstall_quiet_tensorflow

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only a command that passes options on to another tool (beam-embed: Beam's) takes them
        if not hasattr(args, "pipeline_args"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.pipeline_args = extra
    _setup_logging(getattr(args, "verbose", 0))
    if getattr(args, "verbose", 0) < 2:
        quiet_tensorflow()  # TensorFlow's C++ start-up lines stay off the terminal unless -vv
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
    finally:
        uninstall_quiet_tensorflow()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
