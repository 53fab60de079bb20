"""Writing a Milvus index: a version per collection, published by moving the alias; updates in place; batches from Beam's workers.

- :func:`build_milvus` is ``street2shop index build EMBEDDINGS --backend milvus
  --uri URI --collection NAME``: the embeddings into a new version.
- A version is written as the index folders are (:mod:`street2shop.index.versions`),
  with Milvus's own means: :func:`create_version` makes the collection
  ``NAME_v<n>`` (marked unfinished), the entities go in, and
  :func:`publish_version` flushes it, waits for its vector index, loads it,
  marks it finished and moves the alias ``NAME`` to it in one ``alter_alias``;
  then the versions beyond ``keep`` are dropped (never the live one). A build
  that fails or is interrupted drops its collection; one killed outright
  leaves it unfinished, never aliased, and the next publish drops it. Either
  way the alias still names the old version, which keeps serving.
- :func:`update_milvus` is ``street2shop index update milvus:URI#NAME --add
  ... --remove ...``: deletes and upserts in the live collection (no delta, no
  compaction: Milvus compacts its segments itself). A removed product is gone
  for good once readers see the delete; an added one is found within
  Milvus's ``Bounded`` staleness (``common.gracefulTime``, 5 s by default).
- :func:`write_entities` writes batches: inserts into a fresh build, upserts
  where a batch may be written twice (Beam retries a failed bundle; an
  update replaces an image it holds already).
"""

from __future__ import annotations

import calendar
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from street2shop.contract import ModelIdentity, check_same_model
from street2shop.errors import ConfigError, DataError
from street2shop.index.base import check_embeddings, check_positive_int
from street2shop.index.milvus import (
    METRIC, PREFIX, SEARCH_CONSISTENCY, FORMAT, MAX_TEXT, MilvusIndex, MilvusTarget, Properties, call, collection_name, connect, count,
    check_storable, ensure_loaded, entity, entity_key, failure, in_list, index_versions, item_of, iterate, literal, live_collection, parse_target, pymilvus,
)
from street2shop.items import Item, image_id

logger = logging.getLogger(__name__)

INDEX_TYPES = ("HNSW", "FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ")
LITE_INDEX_TYPES = ("HNSW", "FLAT", "IVF_FLAT", "IVF_SQ8")  # what Milvus Lite builds
DEFAULT_INDEX_TYPE = "HNSW"
DEFAULT_KEEP = 2
BATCH = 1000  # entities per insert or upsert
ROW_SHIFT = 32  # a Beam row is manifest << 32 | line
CHUNK = 500  # ids per `in [...]` filter


def index_settings(index_type: str, dimension: int, count_: int | None = None, index_params: dict[str, Any] | None = None,
                   search_params: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The vector index's build and search parameters: street2shop's defaults for ``index_type``, updated with those given.

    HNSW: ``M`` 16, ``efConstruction`` 200, ``ef`` 128 (raised to the candidates
    a query fetches). IVF: ``nlist`` 4·sqrt(count) (16 to 4096; Milvus builds
    it per segment), ``nprobe`` 16; IVF_PQ: ``m`` the largest divisor of the
    dimension up to half of it (2 dimensions per byte-sized code: 8x smaller
    than float32), ``nbits`` 8.
    """
    if index_type not in INDEX_TYPES:
        raise ConfigError(f"index_type must be one of {', '.join(INDEX_TYPES)}. Received: index_type={index_type!r}")
    nlist = int(min(4096, max(16, 4 * math.sqrt(count_ or 65536))))
    build: dict[str, Any] = {
        "HNSW": {"M": 16, "efConstruction": 200},
        "FLAT": {},
        "IVF_FLAT": {"nlist": nlist},
        "IVF_SQ8": {"nlist": nlist},
        "IVF_PQ": {"nlist": nlist, "m": max(d for d in range(1, max(1, dimension // 2) + 1) if dimension % d == 0), "nbits": 8},
    }[index_type]
    search: dict[str, Any] = {"HNSW": {"ef": 128}, "FLAT": {}}.get(index_type, {"nprobe": 16})
    return {**build, **(index_params or {})}, {**search, **(search_params or {})}


def check_keep(keep: Any) -> int:
    keep = check_positive_int("keep", keep)
    if keep < 2:
        raise ConfigError("keep must be >= 2: the live version and the one before it, which requests that started on it finish on "
                          f"(and the service, until it sees the alias move). Received: keep={keep}")
    return keep


# ----------------------------------------------------------------------------- versions: create, fill, publish, drop


def preflight(client: Any, target: MilvusTarget, index_type: str) -> None:
    """Refuses, before anything is written, a name Milvus already uses for something else and an index Milvus Lite cannot build."""
    if target.is_lite and index_type not in LITE_INDEX_TYPES:
        raise ConfigError(f"Milvus Lite builds {', '.join(LITE_INDEX_TYPES)}; {index_type} needs a Milvus server (http://host:19530). "
                          f"Received: index_type={index_type!r}")
    if live_collection(client, target) is None and call(target, f"look for {target.name}", client.has_collection, target.name):
        raise DataError(f"{target.name} is a collection at {target.uri}, not the name of a street2shop index: give another --collection "
                        f"(an index's name is the alias of its live version). Received: --collection {target.name}")


def create_version(client: Any, target: MilvusTarget, identity: ModelIdentity, *, index_type: str = DEFAULT_INDEX_TYPE,
                   index_params: dict[str, Any] | None = None, search_params: dict[str, Any] | None = None,
                   count_: int | None = None) -> tuple[int, str]:
    """A new, empty, unfinished collection for the next version of the index; returns ``(version, collection)``."""
    if identity.dimension is None:
        raise DataError(f"the model's dimension is unknown, so no collection can be made for it. Received: {identity}")
    module = pymilvus()
    build, search = index_settings(index_type, identity.dimension, count_, index_params, search_params)
    from street2shop import __version__

    for _ in range(10):  # another writer may take the number first
        version = max(index_versions(client, target), default=0) + 1
        collection = collection_name(target.name, version)
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", module.DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("row", module.DataType.INT64)
        schema.add_field("product_id", module.DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("category", module.DataType.VARCHAR, max_length=MAX_TEXT, nullable=True)
        schema.add_field("image_id", module.DataType.VARCHAR, max_length=64)
        schema.add_field("item", module.DataType.JSON)
        schema.add_field("vector", module.DataType.FLOAT_VECTOR, dim=identity.dimension)
        indexes = client.prepare_index_params()
        indexes.add_index("vector", index_type=index_type, metric_type=METRIC, params=build)
        properties = {
            "format": FORMAT, "model_fingerprint": identity.fingerprint, "model_version": "" if identity.version is None else identity.version,
            "dimension": identity.dimension, "version": version, "next_row": 0, "categories": "[]", "index_type": index_type,
            "search_params": json.dumps(search), "complete": 0, "package_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            client.create_collection(collection, schema=schema, consistency_level=SEARCH_CONSISTENCY,
                                     properties={PREFIX + k: str(v) for k, v in properties.items()})
        except Exception as e:  # noqa: BLE001
            if "exist" in str(getattr(e, "message", e)).lower():
                continue
            raise failure(e, target, f"create the collection {collection}") from None
        try:  # not waited for here: Milvus indexes each segment as it is sealed, and publish_version waits for the last
            call(target, f"create the {index_type} index of {collection}", client.create_index, collection, indexes, sync=False)
            ensure_loaded(client, target, collection)
        except BaseException:
            drop_version(client, target, collection)
            raise
        logger.info("created %s at %s for version %d of %s (%s, %s)", collection, target.uri, version, target.name, index_type, identity)
        return version, collection
    raise DataError(f"could not take a version number for {target.name} at {target.uri}: other writers keep taking them. Received: 10 tries")


def write_entities(client: Any, target: MilvusTarget, collection: str, vectors: np.ndarray, items: Sequence[Item], rows: Sequence[int], *,
                   upsert: bool, progress: Any = None, batch: int = BATCH) -> int:
    """Writes items with their unit vectors and rows in batches of ``batch`` (upserts with ``upsert``); returns how many."""
    method, verb = (client.upsert, "upsert into") if upsert else (client.insert, "insert into")
    for start in range(0, len(items), batch):
        stop = min(len(items), start + batch)
        call(target, f"{verb} {collection}", method, collection, [entity(items[i], vectors[i], rows[i]) for i in range(start, stop)])
        if progress is not None:
            progress.add(stop - start)
    return len(items)


def _wait_indexed(client: Any, target: MilvusTarget, collection: str) -> None:
    """Waits until Milvus has built the vector index over every flushed segment (a search of an unindexed segment is brute force)."""
    waited, said = 0.0, 0.0
    while True:
        described = call(target, f"describe the vector index of {collection}", client.describe_index, collection, "vector")
        state = str(described.get("state", "") or "")
        if state.lower().endswith("failed"):
            raise DataError(f"Milvus could not build the vector index of {collection} at {target.uri}: "
                            f"{described.get('index_state_fail_reason') or 'no reason given'}; the alias still names the live version. "
                            f"Received: state={state}")
        pending = int(described.get("pending_index_rows", 0) or 0)
        if not pending:
            return
        if waited - said >= 30:
            logger.info("waiting for Milvus to index %s: %d rows to go", collection, pending)
            said = waited
        time.sleep(1.0)
        waited += 1.0


def _wait_lite_index(target: MilvusTarget, collection: str) -> None:
    """Milvus Lite reports its vector index built at once and builds it in a background thread: waits for that thread.

    Best effort, through Milvus Lite's own objects in this process: if they have moved, the index is built a little later.
    """
    if not target.is_lite:
        return
    try:
        from milvus_lite.server_manager import server_manager_instance

        _, db, _ = server_manager_instance._servers[os.path.abspath(target.uri)]
        logger.info("waiting for Milvus Lite to build the vector index of %s (HNSW: minutes per 10^5 vectors on one core)", collection)
        db.get_collection(collection)._wait_for_bg()
    except Exception as e:  # noqa: BLE001 - private to Milvus Lite
        logger.debug("could not wait for Milvus Lite's background index build of %s: %s", collection, e)


def publish_version(client: Any, target: MilvusTarget, version: int, collection: str, *, next_row: int, categories: Iterable[str],
                    keep: int = DEFAULT_KEEP) -> int:
    """Makes a filled collection the live version: flush, index, load, mark it finished, move the alias; returns its count.

    Then drops the versions beyond ``keep`` (:func:`prune`).
    """
    call(target, f"flush {collection}", client.flush, collection)
    _wait_indexed(client, target, collection)
    _wait_lite_index(target, collection)
    ensure_loaded(client, target, collection)
    total = count(client, target, collection)
    call(target, f"mark {collection} finished", client.alter_collection_properties, collection, properties={
        PREFIX + "next_row": str(int(next_row)), PREFIX + "categories": json.dumps(sorted(set(categories))), PREFIX + "complete": "1"})
    live = live_collection(client, target)
    if live is None:
        call(target, f"create the alias {target.name}", client.create_alias, collection, target.name)
    else:
        call(target, f"move the alias {target.name} from {live} to {collection}", client.alter_alias, collection, target.name)
    logger.info("published %s version %d (%s, %d items) at %s; it was %s", target.name, version, collection, total, target.uri, live or "new")
    prune(client, target, version, keep, previous=live)
    return total


def drop_version(client: Any, target: MilvusTarget, collection: str) -> None:
    """Drops an unpublished collection (a failed or interrupted build); the alias never named it. Best effort: a failure is logged."""
    try:
        if live_collection(client, target) != collection:
            client.drop_collection(collection)
            logger.warning("dropped the unfinished collection %s at %s; %s still names the version it named", collection, target.uri, target.name)
    except Exception as e:  # noqa: BLE001 - cleaning up after a failure must not hide it
        logger.warning("could not drop the unfinished collection %s at %s (the next build drops it): %s", collection, target.uri, e)


#: An unfinished collection younger than this may be another build under way (a Beam run takes hours), so no build drops it.
UNFINISHED_GRACE_HOURS = 24.0


def _age_hours(created_at: str) -> float:
    """Hours since ``created_at`` (``%Y-%m-%dT%H:%M:%SZ``); unknown or unreadable counts as old."""
    try:
        return (time.time() - calendar.timegm(time.strptime(created_at, "%Y-%m-%dT%H:%M:%SZ"))) / 3600
    except ValueError:
        return float("inf")


def prune(client: Any, target: MilvusTarget, published: int, keep: int, *, previous: str | None = None) -> list[str]:
    """Drops the index's versions up to ``published`` beyond the ``keep`` newest finished ones, and the unfinished ones before it
    begun more than :data:`UNFINISHED_GRACE_HOURS` ago (a build killed on the way; a younger one may be another build under way).

    Never the live one, nor ``previous`` (the one live until a moment ago: requests may still be on it), never a newer one (a
    build under way), never a collection that is not street2shop's. Returns what was dropped.
    """
    live = live_collection(client, target)
    kept, dropped = 0, []
    for version, collection in sorted(index_versions(client, target).items(), reverse=True):
        if version > published:
            continue
        try:
            properties = Properties.read(client, target, collection)
        except DataError:
            logger.warning("leaving %s at %s alone: it is named like a version of %s but is not a street2shop index", collection, target.uri, target.name)
            continue
        complete = properties.complete
        if collection in (live, previous) or (complete and kept < keep):
            kept += complete
            continue
        if not complete and _age_hours(properties.created_at) < UNFINISHED_GRACE_HOURS:
            logger.info("leaving the unfinished %s at %s alone: begun %s, it may be another build under way", collection, target.uri,
                        properties.created_at or "at an unknown time")
            continue
        try:
            call(target, f"drop {collection}", client.drop_collection, collection)
            dropped.append(collection)
        except DataError as e:
            logger.warning("could not drop the old version %s: %s", collection, e)
    if dropped:
        logger.info("dropped %s at %s (keeping %d versions)", ", ".join(dropped), target.uri, keep)
    return dropped


# ----------------------------------------------------------------------------- index build --backend milvus


def _unique(vectors: np.ndarray, items: Sequence[Item]) -> tuple[np.ndarray, list[Item], list[int]]:
    """The items, each product's image once (its last occurrence, as an upsert keeps), with their positions (the rows)."""
    last = {entity_key(item): position for position, item in enumerate(items)}
    if len(last) < len(items):
        logger.warning("%d item(s) repeat a product's image given earlier; the last of each is kept", len(items) - len(last))
    positions = sorted(last.values())
    return vectors[positions], [items[p] for p in positions], positions


def build_milvus(
    embeddings: Sequence[str | os.PathLike[str]],
    target: str | MilvusTarget,
    *,
    name: str | None = None,
    index_type: str = DEFAULT_INDEX_TYPE,
    index_params: dict[str, Any] | None = None,
    search_params: dict[str, Any] | None = None,
    keep: int = DEFAULT_KEEP,
    progress: bool | str = False,
) -> dict[str, Any]:
    """Builds the next version of a Milvus index from embedding folders and makes it the live one.

    Args:
        embeddings: ``street2shop embed`` (or ``beam-embed``) output folders, all of one model.
        target: the URI (a ``.db`` file or ``http(s)://host:port``), or ``milvus:URI#NAME``.
        name: the index's name (the alias), if not in ``target``.
        index_type, index_params, search_params: the vector index (:func:`index_settings`).
        keep: versions kept, the live one included (at least 2).
        progress: a progress bar while the entities are written (see :class:`street2shop.console.Progress`).

    Returns:
        What was built: the index (``milvus:URI#NAME``), version, collection, count and settings.
    """
    from street2shop.console import Progress
    from street2shop.embeddings import read_embedding_sets

    target = parse_target(target, name=name)
    keep = check_keep(keep)
    index_settings(index_type, 2)  # a bad type fails before anything is read
    vectors, rows, identity = read_embedding_sets(embeddings)
    items = [Item.from_dict(row) for row in rows]
    if not items:
        raise DataError(f"no embedded image in {', '.join(map(str, embeddings))}: nothing to index. Received: 0 items")
    vectors, items, positions = _unique(check_embeddings(vectors, items, vectors.shape[1]), items)
    identity = ModelIdentity(identity.fingerprint, identity.version, int(vectors.shape[1]))
    client = connect(target)
    preflight(client, target, index_type)
    version, collection = create_version(client, target, identity, index_type=index_type, index_params=index_params,
                                         search_params=search_params, count_=len(items))
    bar = Progress(len(items), f"writing {collection}", unit="images", mode=progress)
    try:
        write_entities(client, target, collection, vectors, items, positions, upsert=False, progress=bar)
        bar.close()
        total = publish_version(client, target, version, collection, next_row=positions[-1] + 1,
                                categories={item.category for item in items if item.category}, keep=keep)
    except BaseException:
        bar.close(erase=True)
        drop_version(client, target, collection)
        raise
    index = MilvusIndex.open(target, collection=collection)
    return {"index": target.spec, "version": version, "kind": "milvus", "count": total, **index.config()}


# ----------------------------------------------------------------------------- index update milvus:URI#NAME


def _chunks(values: Sequence[str], size: int = CHUNK) -> Iterable[list[str]]:
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def _removals(client: Any, target: MilvusTarget, collection: str, ids: Sequence[str]) -> tuple[dict[str, dict[str, str | None]], set[str]]:
    """``{id: {key: category}}``, the entities each id names (as a product id, an image id or an image path), and the ids that are products."""
    named: dict[str, dict[str, str | None]] = {}
    products: set[str] = set()
    fields = ["key", "product_id", "image_id", "category", "item"]
    for chunk in _chunks(sorted(set(ids))):
        asked = set(chunk)
        for found in iterate(client, target, collection, in_list("product_id", chunk), fields):
            named.setdefault(found["product_id"], {})[found["key"]] = found.get("category")
            products.add(found["product_id"])
        as_path = {image_id(i): i for i in chunk}
        for found in iterate(client, target, collection, in_list("image_id", sorted(asked | set(as_path))), fields):
            if found["image_id"] in asked:
                named.setdefault(found["image_id"], {})[found["key"]] = found.get("category")
            path = as_path.get(found["image_id"])
            if path is not None and item_of(found).image_path == path:
                named.setdefault(path, {})[found["key"]] = found.get("category")
    return named, products


def update_milvus(
    spec: str | MilvusTarget,
    *,
    add: Sequence[str | os.PathLike[str]] = (),
    remove: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Removes and adds catalogue images in the live collection of a Milvus index, in place (no new version).

    Args:
        spec: ``milvus:URI#NAME``.
        add: embeddings folders of the same model as the index. An image the
            index holds already for the same product is replaced (an upsert);
            the others are appended (rows after the largest).
        remove: a file of ids to remove, one per line: product ids (every image
            of the product), image ids or image paths.

    Returns:
        What changed: added, replaced, removed, the items now, and the delay before every reader sees it.

    Raises:
        ModelMismatchError: an added folder is of another model than the index.
        DataError: a removal names nothing in the index, or the update would leave it empty (nothing is written).
    """
    from street2shop.embeddings import read_embedding_sets
    from street2shop.index.updates import read_removals

    if not add and remove is None:
        raise DataError("give --add EMBEDDINGS and/or --remove IDS_FILE: nothing to update. Received: neither")
    index = MilvusIndex.open(spec)
    target, collection, client = index.target, index.collection, connect(index.target)
    removed = {"products": 0, "images": 0, "rows": 0}
    gone: dict[str, str | None] = {}  # key -> category
    if remove is not None:
        ids = read_removals(remove)
        named, products = _removals(client, target, collection, ids)
        unknown = [i for i in ids if i not in named]
        if unknown:
            raise DataError(f"{len(unknown)} id(s) of {remove} name no product, image id or image path in the index: "
                            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; nothing was written")
        for i in dict.fromkeys(ids):
            removed["products" if i in products else "images"] += 1
            gone.update(named[i])
        removed["rows"] = len(gone)

    vectors, items, rows = np.zeros((0, index.dimension), np.float32), [], []
    present: set[str] = set()
    if add:
        found, rows_, identity = read_embedding_sets(add)
        check_same_model(index.identity, identity, f"the embeddings {', '.join(map(str, add))}")
        new_items = [Item.from_dict(row) for row in rows_]
        vectors, items, _ = _unique(check_embeddings(found, new_items, index.dimension), new_items)
        keys = [entity_key(item) for item in items]
        for chunk in _chunks(keys):
            present.update(e["key"] for e in iterate(client, target, collection, in_list("key", chunk), ["key"]))
        present -= set(gone)
        start = index.properties.next_row
        rows = list(range(start, start + len(items)))
    live = len(index) - len(gone) + len(items) - len(present)
    if live <= 0:
        raise DataError("the update would leave the catalogue empty; nothing was written. Received: every item removed")

    for item in items:  # every refusal before the first write: a refused update changes nothing
        check_storable(item)
    if rows:  # the rows are taken before they are written: an update that fails on the way never hands them out twice
        call(target, f"update the properties of {collection}", client.alter_collection_properties, collection,
             properties={PREFIX + "next_row": str(rows[-1] + 1)})
    keys_gone = sorted(gone)
    for chunk in _chunks(keys_gone):
        call(target, f"delete from {collection}", client.delete, collection, ids=chunk)
    write_entities(client, target, collection, vectors, items, rows, upsert=True)
    categories = set(index.categories()) | {item.category for item in items if item.category}
    for category in {c for c in gone.values() if c} - {item.category for item in items}:
        if not count(client, target, collection, f"category == {literal(category)}"):
            categories.discard(category)
    call(target, f"update the properties of {collection}", client.alter_collection_properties, collection, properties={
        PREFIX + "next_row": str(rows[-1] + 1 if rows else index.properties.next_row), PREFIX + "categories": json.dumps(sorted(categories))})
    index.refresh()
    result = {
        "backend": "milvus", "index": target.spec, "collection": collection, "version": index.version,
        "added": len(items), "replaced": len(present), "removed": removed, "live_count": len(index),
        "visible_within": f"Milvus's Bounded consistency: every reader sees it within common.gracefulTime (5 s by default); {collection} stays the live version",
    }
    logger.info("updated %s in place (%s): +%d (%d replacing), -%d; %d items", target, collection, len(items), len(present), len(gone), len(index))
    return result
