"""A Milvus index: the catalogue in a Milvus collection, behind the one search interface, for catalogues beyond one machine.

**Where it is**: ``milvus:URI#NAME``, where URI is what pymilvus connects to
(a Milvus Lite file ending in ``.db``: embedded in this process, nothing to
start; or ``http(s)://host:19530`` for Milvus standalone or a cluster) and NAME
the index's name (``street2shop`` when left out). ``search``, ``evaluate``,
:func:`~street2shop.index.load_index` and the service take this form wherever
they take an index base. The token of a server that wants one comes from the
``MILVUS_TOKEN`` environment variable (``user:password`` or an API key), never
from the command line or the URI.

**The collection** (one per index version, ``NAME_v<n>``; the alias ``NAME``
names the live one, switched with ``alter_alias`` as a rename publishes an
index folder: :mod:`street2shop.index.milvus_write`):

``key``
    VARCHAR primary key: the item's product and image (:func:`entity_key`).
    One shop photo can show several products, so the image id alone is not unique.
``row``
    INT64: the order the items were added in, which breaks ties (the one
    ranking rule). Dense ``0..N-1`` from ``index build``; ``manifest << 32 | line``
    from ``beam-embed --to-milvus`` (the same order, so the same ties); an
    update appends after the largest.
``product_id``, ``category`` (nullable), ``image_id``
    VARCHAR scalar fields: the category filter and the excluded products are
    Milvus filter expressions over them.
``item``
    JSON: the whole item record (:meth:`Item.to_dict`), so a new column of the
    item table reaches the answers with no schema change.
``vector``
    FLOAT_VECTOR of the model's dimension, metric COSINE.

and in its properties (``street2shop.*``) the format, the model's
fingerprint, version and dimension, the index version, the next free row, the
categories, the search parameters and whether the build finished.

**Answers** are the exact index's: each query fetches more candidates than it
needs (its k, four times over for products) with their stored vectors, ranks
them by :mod:`street2shop.index.ranking` (cosines in float64 from the stored
float32 vectors, ties by row, each product once at its best image), and
fetches more (x4) until nothing left behind could rank among the answers: with
a FLAT index the lists equal :class:`~street2shop.index.ExactIndex`'s, ties
and similarities included. ``rerank=False`` takes Milvus's own float32 scores
instead of the vectors (a smaller answer on the wire).

**Consistency**: searches read at Milvus's ``Bounded`` level (its default): an
update is visible to every reader within Milvus's ``common.gracefulTime``
(5 s by default), without the wait for the newest timestamp that ``Strong``
adds to each search. Writers check what they wrote with ``Strong`` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from street2shop.contract import ModelIdentity, check_same_model
from street2shop.errors import ConfigError, DataError, ServerUnavailableError, Street2ShopError
from street2shop.index import ranking
from street2shop.index.base import SearchIndex, SearchResult, _result
from street2shop.items import Item, catalogue_photos

logger = logging.getLogger(__name__)

SCHEME = "milvus:"
DEFAULT_NAME = "street2shop"
TOKEN_ENV = "MILVUS_TOKEN"
FORMAT = 1
PREFIX = "street2shop."
METRIC = "COSINE"
SEARCH_CONSISTENCY = "Bounded"
MAX_LIMIT = 16384  # Milvus's largest topk (and nq x topk per call is kept under it)
MAX_TEXT = 4096  # longest product id or category stored
CONNECT_SECONDS = 10.0
#: Seconds a search or a look-up may take before it fails (a hung server must not hold a request, or the service's slot, for minutes).
REQUEST_SECONDS = 30.0
SCORE_TOLERANCE = 1e-5  # Milvus's float32 cosine vs the float64 one: no unseen item can be closer than this to the answers
FIELDS = ("key", "row", "product_id", "category", "image_id", "item", "vector")
OUTPUT = ["row", "product_id", "category", "image_id", "item"]
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_REMOTE = re.compile(r"(https?|tcp)://", re.IGNORECASE)


# ----------------------------------------------------------------------------- where: milvus:URI#NAME


@dataclasses.dataclass(frozen=True)
class MilvusTarget:
    """A Milvus index's place: the URI pymilvus connects to and the index's name (its alias).

    Args:
        uri: str, a Milvus Lite file (``catalogue.db``) or ``http(s)://host:port``.
        name: str, the index's name: the alias of its live version (letters, digits, ``_``).
    """

    uri: str
    name: str = DEFAULT_NAME

    @property
    def spec(self) -> str:
        """The form ``--index`` takes: ``milvus:URI#NAME``."""
        return f"{SCHEME}{self.uri}#{self.name}"

    @property
    def is_lite(self) -> bool:
        """A Milvus Lite file (embedded in this process), not a server."""
        return not _REMOTE.match(self.uri)

    def __str__(self) -> str:
        return self.spec


def is_milvus(spec: Any) -> bool:
    """Whether ``spec`` names a Milvus index (``milvus:...``) rather than an index base or folder."""
    return isinstance(spec, MilvusTarget) or (isinstance(spec, str) and spec.startswith(SCHEME))


def parse_target(text: str | MilvusTarget, *, name: str | None = None) -> MilvusTarget:
    """``milvus:URI#NAME`` (the ``milvus:`` may be left out here, NAME too) → a :class:`MilvusTarget`.

    ``name`` is the name given apart (``--collection``); it must agree with a ``#NAME``.

    Raises:
        ConfigError: an empty URI, a URI with credentials in it, a local file not ending in ``.db``, a bad name.
    """
    if isinstance(text, MilvusTarget):
        return text if name is None or name == text.name else MilvusTarget(text.uri, name)
    raw = text[len(SCHEME):] if text.startswith(SCHEME) else text
    uri, _, fragment = raw.rpartition("#") if "#" in raw else (raw, "", "")
    if fragment and name and fragment != name:
        raise ConfigError(f"the index's name is given twice, differently: #{fragment} and --collection {name}. Received: {text!r}")
    name = fragment or name or DEFAULT_NAME
    if not uri:
        raise ConfigError(f"a Milvus index is milvus:URI#NAME with URI a Milvus Lite file (catalogue.db) or http://host:19530. Received: {text!r}")
    if _REMOTE.match(uri):
        if "@" in uri.split("://", 1)[1].split("/", 1)[0]:
            raise ConfigError(f"credentials do not go in the URI (it is logged and shown): put them in the {TOKEN_ENV} environment "
                              f"variable ('user:password' or an API key). Received: a URI with a user part")
        if "?" in uri:
            raise ConfigError(f"a Milvus URI takes no query string (a token there would be logged and shown): put a token in the "
                              f"{TOKEN_ENV} environment variable. Received: a URI with a query string")
    elif not uri.endswith(".db"):
        raise ConfigError(f"a Milvus Lite file must end in .db (or give http://host:19530 for a server). Received: uri={uri!r}")
    if not _NAME.fullmatch(name):
        raise ConfigError(f"an index name is letters, digits and _ (not starting with a digit), at most 200 characters, as Milvus "
                          f"names collections and aliases. Received: name={name!r}")
    return MilvusTarget(uri, name)


# ----------------------------------------------------------------------------- connecting, and Milvus's refusals as ours


_clients: dict[tuple[str, str], Any] = {}
_clients_lock = threading.Lock()


def pymilvus() -> Any:
    """The pymilvus module, or a ConfigError saying what to install."""
    # pymilvus configures logging when imported (logging.config.dictConfig), which closes every handler the process
    # has: a host application's log file, and TensorFlow's absl handler with the stream it writes to (a redirected
    # stderr). Its import leaves the handlers that are there alone.
    import logging.config

    clear = getattr(logging.config, "_clearExistingHandlers", None)
    if clear is not None and "pymilvus" not in sys.modules:
        logging.config._clearExistingHandlers = lambda: None
    try:
        import pymilvus as module
    except ImportError:
        raise ConfigError("a Milvus index needs pymilvus (and milvus-lite for a .db file): pip install 'street2shop[milvus]'. "
                          "Received: no module pymilvus") from None
    finally:
        if clear is not None:
            logging.config._clearExistingHandlers = clear
    # pymilvus prints every refused call through its own handler, and Milvus Lite a traceback when its file is
    # taken; street2shop says what failed in one line instead (-vv keeps theirs).
    if not logging.getLogger("street2shop").isEnabledFor(logging.DEBUG):
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
        logging.getLogger("milvus_lite.server_manager").setLevel(logging.CRITICAL)
    return module


def connect(target: MilvusTarget) -> Any:
    """A pymilvus ``MilvusClient`` for ``target`` (one per URI and token, shared by this process's threads).

    Raises:
        ConfigError: pymilvus (or milvus-lite) is not installed.
        DataError: a Milvus Lite file whose folder is missing, or that another process holds.
        ServerUnavailableError: no Milvus answers at the URI.
    """
    token = os.environ.get(TOKEN_ENV, "")
    key = (os.path.abspath(target.uri) if target.is_lite else target.uri, token)
    with _clients_lock:
        if key in _clients:
            return _clients[key]
        module = pymilvus()
        if target.is_lite:
            folder = os.path.dirname(os.path.abspath(target.uri))
            if not os.path.isdir(folder):
                raise DataError(f"the folder of the Milvus Lite file does not exist: create it, or give another path. Received: {target.uri}")
            try:
                import milvus_lite  # noqa: F401
            except ImportError:
                raise ConfigError("a Milvus Lite file (.db) needs milvus-lite: pip install 'street2shop[milvus]'. Received: no module milvus_lite") from None
        # pymilvus pings every 10 s, more often than Milvus Lite's in-process gRPC server allows: it would answer
        # with GOAWAY (too_many_pings) during a long wait. Nothing is between the two on loopback to keep alive.
        options = {"grpc_options": {"grpc.keepalive_time_ms": 3_600_000}} if target.is_lite else {}
        try:
            client = module.MilvusClient(uri=target.uri, token=token, timeout=CONNECT_SECONDS, **options)
        except Exception as e:  # noqa: BLE001 - pymilvus raises its own kinds, and gRPC's
            if target.is_lite and _lite_held(target.uri):
                raise DataError(f"the Milvus Lite file {target.uri} is open in another process (Milvus Lite allows one process at a "
                                f"time): stop that process (a service, a build), or use a Milvus server for a build beside a running "
                                f"service") from None
            raise failure(e, target, "connect") from None
        _clients[key] = client
        return client


def _lite_held(path: str) -> bool:
    """Whether another process holds the Milvus Lite file (its advisory lock)."""
    lock = os.path.join(os.path.abspath(path), "LOCK")
    if not os.path.exists(lock):
        return False
    import fcntl

    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def release(target: MilvusTarget) -> None:
    """Closes this process's client for ``target`` and, for a Milvus Lite file, stops its embedded server (frees the file for another process)."""
    with _clients_lock:
        for key in [k for k in _clients if k[0] == (os.path.abspath(target.uri) if target.is_lite else target.uri)]:
            try:
                _clients.pop(key).close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
    if target.is_lite:
        try:
            from milvus_lite.server_manager import server_manager_instance
        except ImportError:
            return
        server_manager_instance.release_server(target.uri)


def _message(error: BaseException) -> str:
    text = getattr(error, "message", "")
    if not text and callable(getattr(error, "details", None)):  # a gRPC error
        text = error.details()
    return str(text or error).strip()


def is_unreachable(error: BaseException) -> bool:
    """A failure to reach the server (not a refusal by it)."""
    try:
        import grpc

        if isinstance(error, grpc.RpcError) and error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return True
    except ImportError:  # pragma: no cover - pymilvus needs grpc
        pass
    name = type(error).__name__
    text = _message(error).lower()
    return name in ("ConnectError", "MilvusUnavailableException") or "fail connecting" in text or "deadline exceeded" in text


def is_missing(error: BaseException) -> bool:
    """Milvus says a collection or alias does not exist."""
    text = _message(error).lower()
    return getattr(error, "code", None) == 100 or "not exist" in text or "not found" in text


def failure(error: BaseException, target: MilvusTarget, action: str) -> Street2ShopError:
    """A Milvus failure as one of ours, its message saying what to do."""
    if isinstance(error, Street2ShopError):
        return error
    text = _message(error)
    if is_unreachable(error):
        return ServerUnavailableError(
            f"cannot reach Milvus at {target.uri} to {action}: is it running (deploy/compose.yaml, --profile milvus) and the URI "
            f"right? Received: {text}")
    hint = f" (the token comes from {TOKEN_ENV})" if re.search(r"auth|credential|token|password|permission", text, re.I) else ""
    return DataError(f"Milvus at {target.uri} refused to {action}{hint}. Received: {text}")


def call(target: MilvusTarget, action: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, a pymilvus call, with its failures as ours (:func:`failure`)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - see failure()
        raise failure(e, target, action) from None


def literal(text: str) -> str:
    """A string as a Milvus filter literal (double quotes; the escapes both Milvus and Milvus Lite read)."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'


def in_list(field: str, values: Sequence[str], *, negate: bool = False) -> str:
    """``field in [...]`` (``not in`` with ``negate``) over string values."""
    return f"{field} {'not in' if negate else 'in'} [{', '.join(literal(v) for v in values)}]"


# ----------------------------------------------------------------------------- the collection: names, entities, properties


def collection_name(name: str, version: int) -> str:
    """The collection of index version ``version``: ``NAME_v<version>``."""
    return f"{name}_v{version}"


def version_of(name: str, collection: str) -> int | None:
    """The version number of a collection named ``NAME_v<n>``, else None."""
    found = re.fullmatch(re.escape(name) + r"_v(\d+)", collection)
    return int(found.group(1)) if found else None


def entity_key(item: Item) -> str:
    """The primary key of an item's entity: 32 hex digits of the SHA-256 of its product id and image id.

    The same product's same image has the same key in every version, so adding it again replaces it (an upsert).
    """
    return hashlib.sha256(f"{item.product_id}\x00{item.image_id}".encode("utf-8")).hexdigest()[:32]


def check_storable(item: Item) -> Item:
    """``item``, if Milvus can store it (its product id and category fit the text fields); DataError otherwise."""
    for name, value in (("product_id", item.product_id), ("category", item.category or "")):
        if len(value.encode("utf-8")) > MAX_TEXT:
            raise DataError(f"a {name} longer than {MAX_TEXT} bytes cannot be stored in Milvus. Received: {value[:60]!r}... ({len(value)} characters)")
    return item


def entity(item: Item, vector: np.ndarray, row: int) -> dict[str, Any]:
    """An item, its unit vector and its row as a Milvus entity (the fields of the module doc)."""
    check_storable(item)
    return {
        "key": entity_key(item),
        "row": int(row),
        "product_id": item.product_id,
        "category": item.category,
        "image_id": item.image_id,
        "item": item.to_dict(),
        "vector": np.asarray(vector, np.float32).tolist(),
    }


def item_of(found: dict[str, Any]) -> Item:
    """The item of an entity Milvus returned."""
    return Item.from_dict(found.get("item") or {"product_id": found["product_id"], "category": found.get("category")})


@dataclasses.dataclass(frozen=True)
class Properties:
    """What a street2shop collection says about itself (its ``street2shop.*`` properties)."""

    identity: ModelIdentity
    version: int | None
    next_row: int
    categories: tuple[str, ...]
    search_params: dict[str, Any]
    index_type: str
    complete: bool
    created_at: str = ""  # when the build began, UTC ("2026-12-07T07:00:00Z")

    @classmethod
    def read(cls, client: Any, target: MilvusTarget, collection: str) -> Properties:
        """The properties of ``collection``, checked.

        Raises:
            DataError: the collection is missing, is not a street2shop index, or of an unknown format.
        """
        described = call(target, f"describe the collection {collection}", client.describe_collection, collection)
        ours = {k[len(PREFIX):]: v for k, v in (described.get("properties") or {}).items() if k.startswith(PREFIX)}
        if not ours:
            raise DataError(
                f"the collection {collection} at {target.uri} is not a street2shop index: it has none of its properties (made by another "
                f"tool?); build one with `street2shop index build EMBEDDINGS --backend milvus --uri {target.uri} --collection NAME`")
        if ours.get("format") != str(FORMAT):
            raise DataError(f"the collection {collection} at {target.uri} is in an unknown street2shop format (this street2shop reads "
                            f"format {FORMAT}). Received: format={ours.get('format')!r}")
        try:
            dimension = int(ours["dimension"])
            identity = ModelIdentity(ours["model_fingerprint"], int(ours["model_version"]) if ours.get("model_version") else None, dimension)
            properties = cls(
                identity,
                int(ours["version"]) if ours.get("version") else version_of(target.name, collection),
                int(ours.get("next_row") or 0),
                tuple(json.loads(ours.get("categories") or "[]")),
                dict(json.loads(ours.get("search_params") or "{}")),
                ours.get("index_type", ""),
                ours.get("complete") == "1",
                ours.get("created_at", ""),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"the street2shop properties of the collection {collection} at {target.uri} are incomplete or malformed. "
                            f"Received: {e!r}") from None
        vector = next((f for f in described.get("fields", []) if f.get("name") == "vector"), None)
        stored = (vector or {}).get("params", {}).get("dim")
        if stored is not None and int(stored) != dimension:
            raise DataError(f"the collection {collection} at {target.uri} holds vectors of dimension {stored} but says {dimension}. "
                            f"Received: dim={stored}")
        return properties


def live_collection(client: Any, target: MilvusTarget) -> str | None:
    """The collection the alias ``target.name`` names now, or None if there is no such alias."""
    try:
        return client.describe_alias(target.name)["collection_name"]
    except Exception as e:  # noqa: BLE001
        if is_missing(e) and not is_unreachable(e):
            return None
        raise failure(e, target, f"look up the alias {target.name}") from None


def index_versions(client: Any, target: MilvusTarget) -> dict[int, str]:
    """``{version: collection}`` of every collection of the index (finished or not)."""
    names = call(target, "list the collections", client.list_collections)
    return {v: c for c in names if (v := version_of(target.name, c)) is not None}


def count(client: Any, target: MilvusTarget, collection: str, expr: str = "") -> int:
    """How many entities match ``expr`` now (a ``Strong`` read)."""
    answer = call(target, f"count the entities of {collection}", client.query, collection, filter=expr, output_fields=["count(*)"],
                  consistency_level="Strong")
    return int(answer[0]["count(*)"]) if answer else 0


def iterate(client: Any, target: MilvusTarget, collection: str, expr: str, fields: Sequence[str], batch: int = 4096) -> Iterator[dict[str, Any]]:
    """Every entity matching ``expr`` (``""``: all), with ``fields``, in batches (a ``Strong`` read)."""
    iterator = call(target, f"read the entities of {collection}", client.query_iterator, collection, batch_size=batch, filter=expr,
                    output_fields=list(fields), consistency_level="Strong")
    try:
        while True:
            page = call(target, f"read the entities of {collection}", iterator.next)
            if not page:
                return
            yield from page
    finally:
        iterator.close()


def ensure_loaded(client: Any, target: MilvusTarget, collection: str) -> None:
    """Loads ``collection`` into memory (query nodes) unless it is: Milvus searches only loaded collections."""
    state = call(target, f"ask whether {collection} is loaded", client.get_load_state, collection).get("state")
    if str(getattr(state, "name", state)) != "Loaded":
        logger.info("loading the collection %s at %s", collection, target.uri)
        call(target, f"load the collection {collection}", client.load_collection, collection)


# ----------------------------------------------------------------------------- the index


class MilvusIndex(SearchIndex):
    """One version of an index kept in a Milvus collection, answering as the exact index does (see the module doc).

    Open it with :meth:`open` (or :func:`~street2shop.index.load_index` with
    ``milvus:URI#NAME``); it stays on the collection it opened, so a request
    finishes on the version it started with while the alias moves on.

    Rows: ``SearchResult.row`` is the stored row (stable, sparse after updates
    and for ``beam-embed`` collections). :attr:`items` reads the whole item
    table (live items in row order: for evaluation, not for serving), and
    :meth:`rank_images` and :meth:`exact` number rows as positions in it.

    Example:
        >>> index = MilvusIndex.open("milvus:catalogue.db#shoes")
        >>> [r.product_id for r in index.query(street_embedding, k=5, category="bags")]
    """

    kind = "milvus"

    def __init__(self, target: MilvusTarget, collection: str, client: Any, properties: Properties, count_: int) -> None:
        identity = properties.identity
        super().__init__(identity.dimension or 1, model_fingerprint=identity.fingerprint, model_version=identity.version)
        self.target = target
        self.collection = collection
        self._client = client
        self.properties = properties
        self.version = properties.version
        self._count = count_
        self._table: tuple[np.ndarray, tuple[Item, ...]] | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        spec: str | MilvusTarget,
        *,
        collection: str | None = None,
        expected_fingerprint: str | None = None,
        expected_dimension: int | None = None,
    ) -> MilvusIndex:
        """The live version of the index ``spec`` names (``milvus:URI#NAME``), or its ``collection``.

        ``#NAME`` may also name one version's collection itself (``#shoes_v3``).

        Raises:
            DataError: no such index, a collection that is not a street2shop index or an unfinished build.
            ServerUnavailableError: no Milvus answers at the URI.
            ModelMismatchError: another model or dimension than expected.
        """
        target = parse_target(spec)
        client = connect(target)
        if collection is None:
            collection = live_collection(client, target)
            if collection is None:
                if call(target, f"look for {target.name}", client.has_collection, target.name):
                    collection = target.name
                else:
                    versions = sorted(index_versions(client, target))
                    unfinished = f" (collections of unfinished or unpublished builds: {[collection_name(target.name, v) for v in versions]})" if versions else ""
                    raise DataError(
                        f"no Milvus index {target.name!r} at {target.uri}{unfinished}: build one with `street2shop index build "
                        f"EMBEDDINGS --backend milvus --uri {target.uri} --collection {target.name}`")
        properties = Properties.read(client, target, collection)
        if not properties.complete:
            raise DataError(f"the collection {collection} at {target.uri} is an unfinished build (interrupted?), never published; build "
                            f"the index again (the next build drops it). Received: street2shop.complete missing")
        if expected_fingerprint is not None or expected_dimension is not None:
            check_same_model(properties.identity, ModelIdentity(expected_fingerprint or properties.identity.fingerprint, None, expected_dimension),
                             "the model asked for")
        ensure_loaded(client, target, collection)
        index = cls(target, collection, client, properties, count(client, target, collection))
        logger.info("opened Milvus index %s version %s (%s, %d items, %s)", target, index.version, collection, len(index), index.identity)
        return index

    def refresh(self) -> None:
        """Reads the collection's count and properties again (an update in place changes them)."""
        properties = Properties.read(self._client, self.target, self.collection)
        total = count(self._client, self.target, self.collection)
        with self._lock:
            if (total, properties) != (self._count, self.properties):
                self._table = None
            self.properties, self._count = properties, total

    # -- inspection

    def __len__(self) -> int:
        """The entities in the collection when it was opened or last refreshed."""
        return self._count

    def categories(self) -> list[str]:
        return list(self.properties.categories)

    def _read_table(self) -> tuple[np.ndarray, tuple[Item, ...]]:
        with self._lock:
            if self._table is None:
                found = sorted(((int(e["row"]), item_of(e)) for e in iterate(self._client, self.target, self.collection, "", OUTPUT)),
                               key=lambda pair: pair[0])
                self._table = (np.asarray([r for r, _ in found], np.int64), tuple(item for _, item in found))
            return self._table

    @property
    def items(self) -> Sequence[Item]:
        """Every item, in row order (reads the whole table from Milvus once; for evaluation, not for serving)."""
        return self._read_table()[1]

    def image_item(self, image_id: str) -> Item | None:
        found = call(self.target, "look up an image", self._client.query, self.collection,
                     filter=f"image_id == {literal(image_id)}", output_fields=["row", "item", "product_id"], limit=16,
                     timeout=REQUEST_SECONDS)
        items = [item_of(e) for e in sorted(found, key=lambda e: int(e["row"]))]
        return next((i for i in items if i.domain == "shop"), items[0] if items else None)

    def catalogue_photos(self, product_ids: Iterable[str]) -> dict[str, Item]:
        """One query for these products' entities (a search's k products, not the catalogue)."""
        wanted = sorted(set(product_ids))
        if not wanted:
            return {}
        found = call(self.target, "look up catalogue photos", self._client.query, self.collection,
                     filter=in_list("product_id", wanted), output_fields=["row", "item", "product_id"], timeout=REQUEST_SECONDS)
        return catalogue_photos([item_of(e) for e in sorted(found, key=lambda e: int(e["row"]))])

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "backend": "milvus",
            "index": self.target.spec,
            "uri": self.target.uri,
            "collection": self.collection,
            "metric": METRIC,
            "index_type": self.properties.index_type,
            "search_params": dict(self.properties.search_params),
            "consistency_level": SEARCH_CONSISTENCY,
        }

    # -- searching

    def _filter(self, excluded: frozenset[str], category: str | None) -> str:
        parts = [] if category is None else [f"category == {literal(category)}"]
        if excluded:
            parts.append(in_list("product_id", sorted(excluded), negate=True))
        return " and ".join(parts)

    def _params(self, limit: int) -> dict[str, Any]:
        params = dict(self.properties.search_params)
        if "ef" in params:  # HNSW looks at no fewer than the answers asked for
            params["ef"] = max(int(params["ef"]), limit)
        return params

    def _hits(self, queries: np.ndarray, limit: int, expr: str, vectors: bool) -> list[list[dict[str, Any]]]:
        answers = call(
            self.target, f"search {self.collection}", self._client.search, self.collection,
            data=[q.tolist() for q in queries], limit=limit, filter=expr, anns_field="vector",
            output_fields=OUTPUT + (["vector"] if vectors else []),
            search_params={"metric_type": METRIC, "params": self._params(limit)}, timeout=REQUEST_SECONDS,
        )
        return [[{**hit["entity"], "score": float(hit["distance"])} for hit in hits] for hits in answers]

    @staticmethod
    def _ranked(hits: list[dict[str, Any]], query: np.ndarray, k: int, by_product: bool, rerank: bool) -> list[SearchResult]:
        """The one ranking rule over the candidates: exact cosines from their stored vectors (or Milvus's scores), ties by row."""
        rows = np.asarray([int(h["row"]) for h in hits], np.int64)
        if rerank:
            sims = ranking.cosines(np.asarray([h["vector"] for h in hits], np.float32), np.arange(len(hits)), query)
        else:
            sims = np.asarray([h["score"] for h in hits], np.float64)
        table = {int(h["row"]): item_of(h) for h in hits}
        rows, sims = ranking.order(rows, sims)
        return ranking.collect(rows, sims, table, k, by_product=by_product, make=_result)

    def _answers(self, queries: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], category: str | None,
                 rerank: bool) -> list[list[SearchResult]]:
        """Each query's k best: candidates fetched until none left behind could rank among them (x4 each round)."""
        if k > MAX_LIMIT:
            raise ConfigError(f"Milvus answers at most {MAX_LIMIT} results per query. Received: k={k}")
        expr = self._filter(excluded, category)
        limit = min(MAX_LIMIT, k * 4 if by_product else k * 2)
        out: list[list[SearchResult] | None] = [None] * len(queries)
        pending = list(range(len(queries)))
        while pending:
            still = []
            per_call = max(1, MAX_LIMIT // limit)
            for start in range(0, len(pending), per_call):
                chunk = pending[start : start + per_call]
                for i, hits in zip(chunk, self._hits(queries[chunk], limit, expr, rerank)):
                    answers = self._ranked(hits, queries[i], k, by_product, rerank)
                    if limit >= MAX_LIMIT and by_product and len(hits) >= limit and len(answers) < k:
                        out[i] = self._beyond_the_cap(queries[i], answers, k, excluded, category, rerank)
                    elif len(hits) < limit or limit >= MAX_LIMIT or self._settled(hits, answers, k):
                        out[i] = answers
                    else:
                        still.append(i)
            pending, limit = still, min(MAX_LIMIT, limit * 4)
        return [answers or [] for answers in out]

    def _beyond_the_cap(self, query: np.ndarray, answers: list[SearchResult], k: int, excluded: frozenset[str], category: str | None,
                        rerank: bool) -> list[SearchResult]:
        """Fewer than k products among Milvus's most candidates (a few products with thousands of photos near the query): each
        product seen has its best photo among them, and every product not seen scores lower, so the rest of the answer is the
        search again without the products seen."""
        seen = frozenset(a.product_id for a in answers)
        more = self._answers(query[None, :], k - len(answers), True, excluded | seen, category, rerank)[0]
        return answers + [dataclasses.replace(r, rank=len(answers) + j) for j, r in enumerate(more, start=1)]

    @staticmethod
    def _settled(hits: list[dict[str, Any]], answers: list[SearchResult], k: int) -> bool:
        """Whether no candidate left behind (each scoring at most the last fetched) could rank among the k answers, or tie."""
        return len(answers) >= k and answers[-1].similarity > min(h["score"] for h in hits) + SCORE_TOLERANCE

    def _search(self, query: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], search_k: int | None, rerank: bool) -> list[SearchResult]:
        return self._answers(query[None, :], k, by_product, excluded, None, rerank)[0]

    def _search_category(self, query: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], category: str) -> list[SearchResult]:
        """Milvus's filtered search (exact with a FLAT index; with HNSW or IVF as approximate as the whole catalogue's)."""
        return self._answers(query[None, :], k, by_product, excluded, category, True)[0]

    def _search_many(self, queries: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], search_k: int | None, rerank: bool) -> list[list[SearchResult]]:
        return self._answers(queries, k, by_product, excluded, None, rerank)

    # -- evaluation: rows as positions in the item table

    def rank_images(self, embeddings: np.ndarray, depth: int, *, categories: Sequence[str | None] | None = None,
                    with_similarities: bool = False) -> list[Any]:
        """As :meth:`SearchIndex.rank_images`, with rows numbered as positions in :attr:`items`."""
        rows, _ = self._read_table()
        ranked = super().rank_images(embeddings, depth, categories=categories, with_similarities=True)
        out = []
        for found, sims in ranked:
            positions = np.searchsorted(rows, found)
            if len(found) and (positions.max() >= len(rows) or not np.array_equal(rows[positions], found)):
                raise DataError(f"the collection {self.collection} changed while it was being evaluated (a row it answered is not in its "
                                f"item table); evaluate again")
            out.append((positions.astype(np.int64), sims) if with_similarities else positions.astype(np.int64))
        return out

    def exact(self) -> Any:
        """An :class:`~street2shop.index.ExactIndex` over every vector of the collection, in row order (reads them all)."""
        from street2shop.index.exact import ExactIndex

        found = sorted(((int(e["row"]), item_of(e), e["vector"]) for e in
                        iterate(self._client, self.target, self.collection, "", OUTPUT + ["vector"])), key=lambda t: t[0])
        vectors = np.asarray([v for _, _, v in found], np.float32).reshape(len(found), self.dimension)
        return ExactIndex.from_arrays(vectors, [item for _, item, _ in found], model_fingerprint=self.model_fingerprint,
                                      model_version=self.model_version)


# ----------------------------------------------------------------------------- the versions the service follows


class AliasVersions:
    """The version the alias names, as the search service follows it: when the alias moves (either way), that version replaces the current one."""

    def __init__(self, spec: str | MilvusTarget) -> None:
        self.target = parse_target(spec)

    def describe(self) -> str:
        return self.target.spec

    def candidates(self, current: int | None) -> list[tuple[int, str]]:
        """``[(version, collection)]`` of the alias's collection if it is not ``current``; DataError if there is no alias."""
        client = connect(self.target)
        collection = live_collection(client, self.target)
        if collection is None:
            raise DataError(f"no Milvus index {self.target.name!r} at {self.target.uri} yet (no alias {self.target.name}): build one with "
                            f"`street2shop index build EMBEDDINGS --backend milvus --uri {self.target.uri} --collection {self.target.name}`")
        version = version_of(self.target.name, collection)
        if version is None:
            version = Properties.read(client, self.target, collection).version or 0
        return [] if version == current else [(version, collection)]

    def waiting(self) -> str:
        return f"no version of the Milvus index {self.target} yet"

    def load(self, collection: str) -> MilvusIndex:
        return MilvusIndex.open(self.target, collection=collection)

    def refresh(self, index: Any) -> None:
        """An update in place changed the live collection's count and categories: read them again."""
        index.refresh()


__all__ = [
    "AliasVersions", "DEFAULT_NAME", "MilvusIndex", "MilvusTarget", "Properties", "SCHEME", "TOKEN_ENV", "connect", "entity",
    "entity_key", "is_milvus", "parse_target", "release",
]
