"""Items in a Milvus collection, bytes in a blob directory: a collection any number of replicas can share.

    coca serve --vector-store milvus --milvus-uri http://HOST:19530 [--milvus-token-file F]
               [--collection NAME] --data BLOB_DIR

The service process keeps no state of its own. One Milvus row per item (schema below); the
collection's description records the model identity (model, pretrained, dim), checked by
every replica that binds to it. NAME (--collection) is an alias of the collection of the model
generation that answers (NAME_g0 when new; milvus_generations.py: reindex, switch, rollback); a
replica reads and writes that collection (`reading`) and follows the alias. Image bytes go to BLOB_DIR/blobs (a local disk for one
replica, a shared mount for several), written and fsynced before the row that names them.

Identity and idempotency: the primary key is the content's sha256 and rows are written with
`upsert`, so the same bytes added twice — retried, or through two replicas at once — are one
item. The id clients see defaults to the first 128 bits of that sha256 (as in the embedded
store). An explicit id is checked against the collection before the write, under a lock per id
and per content in this replica, so two streams giving one id to two contents get ADDED once
and ALREADY_EXISTS once. Two *replicas* racing to give one new id to two different contents can
both succeed: Milvus has no unique constraint on a non-key field and no conditional write — the
one cross-replica gap, stated here and in README.

Bounds: Milvus measures VARCHAR fields in UTF-8 bytes (the `max_length` of each field in the
collection's schema, read from the collection itself) and a JSON field's serialised bytes
(MAX_META_JSON_BYTES). Every row is checked before anything is written; an item over a bound
fails alone (ItemRejected: INVALID_ARGUMENT naming the field and the bound) and the rest of its
batch is stored. A rejection Milvus still makes (error 1100) is traced to its row the same way.

Captions live in a collection of their own (`<collection>_captions`: content sha256, caption,
and the `created_at` of the item they were made for), so storing one never rewrites the item's
row: a Delete racing a caption can leave an orphan caption row (never read: its created_at
names an item that is gone), never bring the item back. Rows written before this kept their
caption in the item row (`caption`), read when no caption row applies.

Setup from any number of replicas at once: each creates the collections (an identical create is
a no-op in Milvus), then every index, and only then loads, so no load happens before all
indexes exist (Milvus refuses to load a loaded collection whose indexes changed). A collection
already loaded is not given new indexes. What a replica cannot fix by retrying (an index of
another type, a collection that cannot be made) is StoreSetupError: logged once, saying what to
do; health stays NOT_SERVING with that reason, and nothing loops on tracebacks.

Blob files are named `<sha256>.<random>`: each write places its own file and a delete removes
only the file its row named, so no replica can remove another's bytes. A file no row names
(an upsert that lost a race, a crash between placing and writing) is swept once it is older
than `orphan_grace_s`.

Consistency (PLATFORM.md: Bounded misses fresh writes and still shows deletes; Strong costs
~390 ms a search here; Session gives one client its own inserts): reads run at `Session` by
default (a replica sees its own adds at once; others' within Milvus's bounded staleness), and
every read drops ids deleted through this replica in the last `recent_delete_s` seconds (a
delete is not covered by Session in Milvus 2.3): up to MAX_HIDDEN_DELETES ids as a `not (pk in
[...])` term; past that (a bulk delete), reads run at Strong until the window passes, which sees
every delete, so expressions stay bounded. Searches may ask for another level per call
(SearchOptions.consistency); Stats counts at Strong.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import numpy as np

from .blobs import BlobDirectory, discard, fsync_dirs
from .collection import Collection, Hit, Page, StoreUnavailable, Unsupported, check_query, first_hits
from .generations import GenerationChanged
from .milvus_generations import MilvusGenerations, WriteGate
from .query import ADDED_AT, Condition, Filter, Order, QueryInputError
from .store import (AddOutcome, ConflictError, Item, ItemRejected, ModelMismatchError, NewItem, StoreSetupError,
                    default_id)

log = logging.getLogger("search_service.milvus")
T = TypeVar("T")

SCHEMA_VERSION = 1
MAX_ID = 256
MAX_URI = 8192
MAX_CAPTION = 8192
MAX_BLOB_NAME = 256
MAX_META_JSON_BYTES = 65536  # Milvus's bound on one JSON value (common.JSONMaxLength; not in the schema)
MAX_HIDDEN_DELETES = 256  # ids in a read's "recently deleted" term (~70 bytes each); past it, reads run at Strong
INVALID_PARAMETER = 1100  # Milvus's code for a value it refuses (too long, wrong type)
FIELD_NAMES = {"item_id": "id", "meta": "metadata", "uri": "uri", "caption": "caption", "blob": "blob name"}
CAPTIONS_SUFFIX = "_captions"
CONSISTENCY_LEVELS = ("Strong", "Session", "Bounded", "Eventually")
CONNECT_TIMEOUT_S = 2.0
# pymilvus retries a refused connection 75 times (minutes of backoff) unless told otherwise; and it
# bounds retries by `timeout` only when that is an int. A float timeout (the gRPC deadline of each
# attempt) with 2 attempts makes a dead Milvus answer within ~0.1 s, a slow one within the timeout.
RETRY_TIMES = 2
MAX_TOPK = 16384  # Milvus's largest search limit (topk): a tie group deeper than that is cut there
ROW_FIELDS = ["pk", "item_id", "uri", "blob", "meta", "caption", "created_at", "updated_at"]
RANK_FIELDS = ["pk", "item_id"]  # what ranking needs (ties by id); a page reads ROW_FIELDS of its own hits only


@dataclass
class MilvusSettings:
    uri: str = "http://127.0.0.1:19530"
    token: str = ""
    collection: str = "coca_items"
    index_type: str = "HNSW"  # or IVF_FLAT, FLAT ... (Milvus index types)
    hnsw_m: int = 32
    ef_construction: int = 200
    nlist: int = 1024
    ef_search: int = 128  # HNSW: candidates kept while searching (at least k)
    nprobe: int = 32  # IVF: lists visited per query
    consistency: str = "Session"  # reads' default level
    recent_delete_s: float = 60.0  # how long this replica hides its own deletes from reads
    orphan_grace_s: float = 3600.0  # blob files no row names are removed once older than this
    timeout_s: float = 10.0  # per Milvus call

    def __post_init__(self):
        if self.consistency not in CONSISTENCY_LEVELS:
            raise ValueError(f"Milvus consistency must be one of {CONSISTENCY_LEVELS}, got {self.consistency!r}")


def literal(value: str) -> str:
    """A Milvus expression string literal: JSON's quoting (quotes, backslashes, control characters
    escaped; other characters as they are, since Milvus's parser refuses surrogate-pair escapes)."""
    return json.dumps(value, ensure_ascii=False)


def filter_expression(filters: Filter | dict[str, str]) -> str:
    """Conditions (all must hold) as a Milvus boolean expression over the JSON `meta` field and
    `created_at`; Unsupported for what Milvus cannot express here (ranges over metadata: its values
    are stored as strings)."""
    return " and ".join(_condition_expression(c) for c in (Filter.of(filters) or Filter()).conditions)


def _condition_expression(condition: Condition) -> str:
    if condition.is_range:
        if condition.field != ADDED_AT:
            raise Unsupported(f"range on {condition.field!r}: the Milvus store keeps metadata as strings and ranges "
                              f"over added_at only (the embedded store ranges over declared number/date fields)")
        terms = []
        if condition.low is not None:
            terms.append(f"created_at {'>' if condition.low_open else '>='} {condition.low!r}")
        if condition.high is not None:
            terms.append(f"created_at {'<' if condition.high_open else '<='} {condition.high!r}")
        test = " and ".join(terms) or "created_at >= 0"
    else:
        field = f"meta[{literal(condition.field)}]"
        test = (f"{field} == {literal(condition.values[0])}" if len(condition.values) == 1
                else in_list(field, list(condition.values)))
    return f"not ({test})" if condition.negate else f"({test})"


def in_list(field: str, values: list[str]) -> str:
    return f"{field} in [{', '.join(literal(v) for v in values)}]"


class MilvusCollection(MilvusGenerations, Collection):
    """The Collection over a Milvus collection (see the module docstring; generations: milvus_generations.py)."""

    def __init__(self, blob_root, settings: MilvusSettings):
        self.settings = settings
        self.name = settings.collection
        self.blobs = BlobDirectory(blob_root)
        self._client = None
        self._client_lock = threading.Lock()
        self._dim: Optional[int] = None
        self._open = False
        self._size = 0
        self.captions_name = f"{settings.collection}{CAPTIONS_SUFFIX}"
        self._limits: dict[str, int] = {}  # VARCHAR field -> its max_length (UTF-8 bytes), from the collection
        self._caption_limit = MAX_CAPTION  # the caption collection's, read when it is opened
        self._deleted: dict[str, float] = {}  # pk -> monotonic time of a delete through this replica
        self._strong_until = 0.0  # monotonic time until which reads run at Strong (too many recent deletes)
        self._deleted_lock = threading.Lock()
        self._writing = KeyLocks()  # ids and contents being added through this replica
        self._gate = WriteGate()  # adds and deletes through this replica; a generation switch holds them back
        self.generation: Optional[int] = 0  # the model generation reads answer from (milvus_generations.py)
        self._physical: Optional[str] = None  # that generation's collection (NAME's alias target when bound)
        self._said: set[str] = set()  # operator messages already logged

    # ------------------------------------------------------------ Milvus calls
    @property
    def client(self):
        client = self._client
        if client is None:  # connecting can take CONNECT_TIMEOUT_S: not under the lock
            from pymilvus import MilvusClient

            client = MilvusClient(uri=self.settings.uri, token=self.settings.token, timeout=CONNECT_TIMEOUT_S)
            with self._client_lock:
                if self._client is None:
                    self._client = client
                else:
                    client = self._client
        return client

    @property
    def _opts(self) -> dict:
        """Keyword arguments of every Milvus call: its deadline and how often to retry (see RETRY_TIMES)."""
        return {"timeout": float(self.settings.timeout_s), "retry_times": RETRY_TIMES}

    def _call(self, what: str, fn: Callable[..., T]) -> T:
        """Run fn(client); a Milvus that cannot be reached (or is still loading) becomes StoreUnavailable."""
        try:
            return fn(self.client)
        except StoreUnavailable:
            raise
        except Exception as exc:
            if _unreachable(exc):
                self._reconnect_later()
                raise StoreUnavailable(f"vector store (Milvus) at {self.settings.uri} is unavailable "
                                       f"({what}): {_message(exc)}") from None
            raise

    def _read(self, what: str, fn: Callable[..., T]) -> T:
        """`_call` for a read of `reading`: one refused as not found in a first switch's rename gap (NAME renamed,
        its alias a few ms away) is asked again once NAME names a collection. (Adds, deletes and searches on
        this replica failed INTERNAL in that gap, 1 in ~25 runs of the Milvus write-gap test.)"""
        asked = self.reading
        try:
            return self._call(what, fn)
        except Exception as exc:
            if not self.in_rename_gap(exc, asked):
                raise
        self.named_again()
        return self._call(what, fn)

    def _reconnect_later(self) -> None:
        """Drop the connection: pymilvus caches it by address, and its channel backs off reconnecting for up
        to two minutes, so a Milvus that is back would stay unreachable; the next call connects afresh."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a dead connection may fail too
                pass

    def _query(self, expression: str, fields: list[str], level: Optional[str] = None) -> list[dict]:
        """Rows matching the expression, less what this replica deleted lately (dropped here, not in the
        expression: it stays as long as the caller made it)."""
        level, _ = self._level(level)
        rows = self._read("query", lambda c: c.query(
            self.reading, filter=expression, output_fields=fields, **self._opts, consistency_level=level))
        hidden = self._recently_deleted()
        return [r for r in rows if r.get("pk") not in hidden]

    # ------------------------------------------------------------ life cycle
    @property
    def dim(self) -> Optional[int]:
        if self._dim is None:
            info = self._identity()
            self._dim = int(info["embedding_dim"]) if info else None
        return self._dim

    @property
    def reading(self) -> str:
        """The collection reads and writes go to: the generation this replica answers from (NAME until bound)."""
        return self._physical or self.name

    @property
    def is_open(self) -> bool:
        return self._open

    def _identity(self) -> Optional[dict]:
        def describe(client):
            if not client.has_collection(self.reading, **self._opts):
                return None
            return client.describe_collection(self.reading, **self._opts)

        described = self._call("describe collection", describe)
        if described is None:
            return None
        self._limits = _varchar_limits(described)
        try:
            info = json.loads(described.get("description") or "{}")
        except ValueError:
            info = {}
        if info.get("coca_schema") != SCHEMA_VERSION:
            raise ModelMismatchError(f"Milvus collection {self.name!r} was not made by coca-search "
                                     f"(schema {info.get('coca_schema')!r}); name another --collection")
        return info

    def bind_model(self, model: str, pretrained: str, dim: int) -> None:
        wanted = {"coca_schema": SCHEMA_VERSION, "model": model, "pretrained": pretrained, "embedding_dim": dim}
        have = self._identity()
        if have is None:
            self.recover_alias()
            have = self._identity()
        if have is None:
            self.create_aliased(self._item_schema(wanted))
            have = self._identity()  # (another replica's, if it made it a moment before: then checked below)
            if have is None:
                raise StoreUnavailable(f"Milvus collection {self.name!r} was created but cannot be found")
        if {key: have.get(key) for key in wanted} != wanted:
            raise ModelMismatchError(
                f"Milvus collection {self.name!r} holds embeddings of {have.get('model')} ({have.get('pretrained')}, "
                f"dim {have.get('embedding_dim')}) but the model server has {model} ({pretrained}, dim {dim}); "
                "use another --collection or the same model")
        self._dim = dim
        self._physical = self.answering_collection()
        self.generation = self._gen_of(self._physical or self.name)

    @staticmethod
    def _item_schema(identity: dict):
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                            description=json.dumps(identity, sort_keys=True))
        schema.add_field("pk", DataType.VARCHAR, max_length=64, is_primary=True)  # content sha256
        schema.add_field("item_id", DataType.VARCHAR, max_length=MAX_ID)
        schema.add_field("uri", DataType.VARCHAR, max_length=MAX_URI)
        schema.add_field("blob", DataType.VARCHAR, max_length=MAX_BLOB_NAME)
        schema.add_field("meta", DataType.JSON)
        schema.add_field("caption", DataType.VARCHAR, max_length=MAX_CAPTION)  # rows written before caption rows
        schema.add_field("created_at", DataType.DOUBLE)
        schema.add_field("updated_at", DataType.DOUBLE)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=int(identity["embedding_dim"]))
        return schema

    def _caption_schema(self):
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                            description=json.dumps({"coca_captions_of": self.name}))
        schema.add_field("pk", DataType.VARCHAR, max_length=64, is_primary=True)  # the item's content sha256
        schema.add_field("caption", DataType.VARCHAR, max_length=MAX_CAPTION)
        schema.add_field("item_created_at", DataType.DOUBLE)  # the item it was made for (not a later re-add)
        schema.add_field("updated_at", DataType.DOUBLE)
        # Milvus wants a vector field; never searched: it carries the generation whose decoder made the caption
        # ([gen, 0]; rows stored before generations were marked read as generation 0)
        schema.add_field("marker", DataType.FLOAT_VECTOR, dim=2)
        return schema

    def _indexes(self, name: str) -> list[tuple[str, str, Optional[str], dict]]:
        """(field, index type, metric, build parameters) of every index the collection `name` needs."""
        if name == self.captions_name:
            return [("marker", "FLAT", "L2", {})]
        return [("embedding", self.settings.index_type, "IP", self._build_params()), ("item_id", "Trie", None, {})]

    def _create_collection(self, name: str, schema) -> None:
        """Create it without indexes or a load (they follow in open_index); an identical create by another
        replica meanwhile is a no-op in Milvus, and one that fails because it exists is fine too."""
        try:
            self._call(f"create collection {name}", lambda c: c.create_collection(name, schema=schema, **self._opts))
        except StoreUnavailable:
            raise
        except Exception as exc:
            if not self._call("describe collection", lambda c: c.has_collection(name, **self._opts)):
                raise self._setup_error(f"cannot create Milvus collection {name!r}: {_message(exc)}; "
                                        "check that the Milvus user may create collections") from None

    def _ensure_indexes(self, name: str):
        """Make every index the collection needs, before any load: a load sees them all. A collection that is
        already loaded gets none (Milvus would refuse every later load): one missing there is reported. Returns
        the collection's load state as it was read first."""
        from pymilvus import MilvusClient
        from pymilvus.client.types import LoadState

        state = self._call("load state", lambda c: c.get_load_state(name, **self._opts)).get("state")
        have = self._describe_indexes(name)
        for field, kind, metric, params in self._indexes(name):
            if field in have:
                self._check_index(name, field, kind, metric, have[field])
            elif state in (LoadState.Loaded, LoadState.Loading):
                self._say_once(f"Milvus collection {name!r} is loaded without its {kind} index on {field!r}; serving "
                               "without it. To add it: stop the replicas, release the collection, start one replica")
            else:
                index = MilvusClient.prepare_index_params()
                index.add_index(field, index_type=kind, metric_type=metric or "", params=params)
                try:
                    self._call(f"create index on {field}", lambda c: c.create_index(name, index, **self._opts))
                except StoreUnavailable:
                    raise
                except Exception as exc:  # another replica made a different one meanwhile
                    raise self._setup_error(f"cannot create the {kind} index on {field!r} of Milvus collection "
                                            f"{name!r}: {_message(exc)}") from None
        return state

    def _describe_indexes(self, name: str) -> dict[str, dict]:
        def describe(client) -> dict[str, dict]:
            found = (client.describe_index(name, index, **self._opts) for index in client.list_indexes(name, **self._opts))
            return {info["field_name"]: info for info in found if info}

        return self._call("describe indexes", describe)

    def _check_index(self, name: str, field: str, kind: str, metric: Optional[str], have: dict) -> None:
        kind_there, metric_there = str(have.get("index_type", "")), have.get("metric_type")
        if kind_there.upper() != kind.upper() or (metric and metric_there and metric_there.upper() != metric.upper()):
            raise self._setup_error(
                f"Milvus collection {name!r} has a {kind_there} index ({metric_there or 'no metric'}) on {field!r}, "
                f"this replica was started for {kind} ({metric or 'no metric'}): start it with --milvus-index "
                f"{kind_there} like the others, or use another --collection")

    def _load(self, name: str, wait: bool = True) -> None:
        """Load the collection (`wait`: until it is loaded); one that is loaded already with other indexes than
        it has now serves as loaded."""
        try:
            self._call(f"load collection {name}", lambda c: c.load_collection(
                name, timeout=max(self.settings.timeout_s, 60.0), retry_times=RETRY_TIMES, _async=not wait))
        except StoreUnavailable:
            raise
        except Exception as exc:
            if "can't change the index for loaded collection" in _message(exc):
                self._say_once(f"Milvus collection {name!r} is loaded with an older set of indexes; serving with "
                               "them. To use the newer ones: stop the replicas, release the collection, start again")
                return
            raise self._setup_error(f"cannot load Milvus collection {name!r}: {_message(exc)}; see Milvus's log "
                                    "(memory, query nodes)") from None

    def _setup_error(self, message: str) -> StoreSetupError:
        self._say_once(message)
        return StoreSetupError(message)

    def _say_once(self, message: str) -> None:
        """An operator's message, logged once per replica (health probes retry the setup: no log per probe)."""
        if message not in self._said:
            self._said.add(message)
            log.error("%s", message)

    def _build_params(self) -> dict:
        kind = self.settings.index_type.upper()
        if kind == "HNSW":
            return {"M": self.settings.hnsw_m, "efConstruction": self.settings.ef_construction}
        if kind.startswith("IVF"):
            return {"nlist": self.settings.nlist}
        return {}

    def _search_params(self, k: int) -> dict:
        kind = self.settings.index_type.upper()
        if kind == "HNSW":
            return {"metric_type": "IP", "params": {"ef": max(self.settings.ef_search, k)}}
        if kind.startswith("IVF"):
            return {"metric_type": "IP", "params": {"nprobe": self.settings.nprobe}}
        return {"metric_type": "IP", "params": {}}

    def open_index(self, dim: int, progress: bool = False) -> str:
        """Indexes of both collections first, then the loads (see the module docstring: replicas starting
        together on a new collection)."""
        if self._identity() is None:
            raise StoreUnavailable(f"Milvus collection {self.name!r} does not exist (yet)")
        if not self._call("describe collection", lambda c: c.has_collection(self.captions_name, **self._opts)):
            self._create_collection(self.captions_name, self._caption_schema())
        self._caption_limit = self._call("describe collection", lambda c: _varchar_limits(
            c.describe_collection(self.captions_name, **self._opts))).get("caption", MAX_CAPTION)
        from pymilvus.client.types import LoadState

        states = {name: self._ensure_indexes(name) for name in (self.reading, self.captions_name)}
        # loaded already (another replica, an earlier start): a load would only poll its progress, 0.2 s a time
        to_load = [name for name, state in states.items() if state != LoadState.Loaded]
        for name in to_load:  # both at once: a new collection takes Milvus ~2.8 s to load
            self._load(name, wait=False)
        for name in to_load:
            self._load(name)
        self._size = self._count(self.settings.consistency)  # a figure for logs: Strong would wait ~0.25-0.4 s
        self._open = True
        threading.Thread(target=self._sweep_orphans, name="milvus-blob-sweep", daemon=True).start()
        return (f"Milvus collection {self.name!r} at {self.settings.uri}: {self._size} items "
                f"({self.settings.index_type}, reads at {self.settings.consistency})")

    def ping(self) -> None:
        self._call("health check", lambda c: c.has_collection(self.name, timeout=2.0, retry_times=RETRY_TIMES))

    def close(self) -> None:
        self._reconnect_later()

    def _sweep_orphans(self) -> None:
        try:
            removed = self.blobs.sweep(self._referenced_blobs, older_than_s=self.settings.orphan_grace_s)
            if removed:
                log.info("removed %d blob file(s) no item names", removed)
        except Exception as exc:  # best effort: tried again at the next start
            log.warning("blob sweep stopped: %s", _message(exc))

    def _referenced_blobs(self, names: list[str]) -> set[str]:
        known: set[str] = set()
        for start in range(0, len(names), 200):
            rows = self._query(in_list("blob", names[start:start + 200]), ["blob"], level="Strong")
            known.update(r["blob"] for r in rows)
        return known

    # ------------------------------------------------------------ writes
    def add(self, items: list[NewItem], generation: Optional[int] = None
            ) -> list[AddOutcome | ConflictError | ItemRejected]:
        """Check, then write, under this replica's locks on the batch's ids and contents: between the
        conflict check and the upsert no other stream of this replica can claim them. `generation`: the one
        whose model embedded them; GenerationChanged when the alias names another now (nothing stored), or
        once they are stored when another replica switched the alias meanwhile (its `committed`: their outcomes)."""
        keys = [f"sha:{item.sha256}" for item in items] + [f"id:{item.id or default_id(item.sha256)}" for item in items]
        with self._gate.write(), self._writing.hold(keys):
            if generation is not None and generation != self.generation:
                raise GenerationChanged(f"embedded by generation {generation}, the collection answers from "
                                        f"generation {self.generation} now")
            written = self.reading
            try:
                outcomes = self._add(items)
            except Exception as exc:
                if generation is None or not self.in_rename_gap(exc, written):
                    raise
                self.moved_since_write(written)  # (until NAME names the new generation)
                raise GenerationChanged(f"embedded by generation {generation}, whose collection a switch renamed "
                                        "meanwhile") from None
            if generation is not None and (moved := self.moved_since_write(written)) is not None:
                raise GenerationChanged(f"embedded by generation {generation}, stored there while another replica "
                                        f"switched the collection to {moved}", committed=outcomes)
            return outcomes

    def _add(self, items: list[NewItem]) -> list[AddOutcome | ConflictError | ItemRejected]:
        shas = sorted({item.sha256 for item in items})
        present = {r["pk"]: r["item_id"] for r in self._query(in_list("pk", shas), ["pk", "item_id"])}
        wanted_ids = sorted({item.id or default_id(item.sha256) for item in items})
        owners = {r["item_id"]: r["pk"] for r in self._query(in_list("item_id", wanted_ids), ["pk", "item_id"])}
        rewritten = self._rows_to_rewrite(items, present)
        renewed = len(rewritten)  # rows stored already: not counted again
        outcomes: list[AddOutcome | ConflictError | ItemRejected] = []
        rows, placed, written, now = [], [], [], time.time()  # written: (outcome index, blob path or None)
        try:
            for item in items:
                if item.sha256 in rewritten:
                    row = rewritten.pop(item.sha256)
                    outcomes.append(AddOutcome(id=row["item_id"], sha256=item.sha256, added=True, vid=-1,
                                               created_at=row["created_at"]))
                    rows.append({**row, "embedding": np.asarray(item.embedding, np.float32).tolist()})
                    written.append((len(outcomes) - 1, None))
                    continue
                outcome = (self._oversized(self._row(item, item.id or default_id(item.sha256), "", now))
                           or self._decide(item, present, owners, now))
                outcomes.append(outcome)
                if isinstance(outcome, AddOutcome) and outcome.added:
                    blob, path = "", None
                    if item.data is not None:
                        name = f"{item.sha256}.{secrets.token_hex(6)}"
                        path = self.blobs.place(self.blobs.stage(item.data), name)
                        placed.append(path)
                        blob = self.blobs.relative(name)
                    rows.append(self._row(item, outcome.id, blob, now))
                    written.append((len(outcomes) - 1, path))
            fsync_dirs(placed)  # the bytes are durable before the rows that name them
            refused = self._upsert(rows)
        except BaseException:
            for path in placed:
                discard(path)
            raise
        for position, rejection in refused.items():  # Milvus refused these rows alone: they fail alone
            index, path = written[position]
            outcomes[index] = rejection
            if path is not None:
                discard(path)
        stored = [row for position, row in enumerate(rows) if position not in refused]
        with self._deleted_lock:
            for row in stored:
                self._deleted.pop(row["pk"], None)
        self._size += len(stored) - renewed
        return outcomes

    def _rows_to_rewrite(self, items: list[NewItem], present: dict[str, str]) -> dict[str, dict]:
        """The stored rows (by pk) that items marked `rewrite` find under their own id: they take the new
        embedding as they are (an item not there, or there under another id, is added as any other)."""
        shas = [i.sha256 for i in items if i.rewrite and present.get(i.sha256) == (i.id or default_id(i.sha256))]
        return {r["pk"]: r for r in self._query(in_list("pk", shas), ROW_FIELDS)} if shas else {}

    def _oversized(self, row: dict) -> Optional[ItemRejected]:
        """Why Milvus would refuse this row (a field over its bound in UTF-8 bytes), or None."""
        for field, limit in self._limits.items():
            value = row.get(field)
            if isinstance(value, str) and len(value.encode()) > limit:
                return ItemRejected(f"{FIELD_NAMES.get(field, field)} is {len(value.encode())} bytes in UTF-8, over "
                                    f"the Milvus collection's limit of {limit} bytes")
        size = len(_json_bytes(row["meta"]))
        if size > MAX_META_JSON_BYTES:
            return ItemRejected(f"metadata is {size} bytes as JSON, over Milvus's limit of {MAX_META_JSON_BYTES} bytes")
        return None

    def _upsert(self, rows: list[dict]) -> dict[int, ItemRejected]:
        """Write the rows; those Milvus refuses as invalid (error 1100: found by writing each alone) come back by
        position, and the others are written."""
        if not rows:
            return {}
        try:
            self._call("upsert", lambda c: c.upsert(self.reading, rows, **self._opts))
            return {}
        except Exception as exc:
            if getattr(exc, "code", None) != INVALID_PARAMETER:
                raise
            if len(rows) == 1:
                return {0: ItemRejected(f"the Milvus collection refused the item: {_message(exc)}")}
        return {position: rejection for position, row in enumerate(rows) for rejection in self._upsert([row]).values()}

    def bulk_insert(self, items: list[NewItem]) -> None:
        """Load items known to be new (no duplicate checks, no blobs): for benchmarks and bulk loaders that
        deduplicate themselves. `add` is the checked path."""
        now = time.time()
        rows = [self._row(item, item.id or default_id(item.sha256), "", now) for item in items]
        self._call("insert", lambda c: c.insert(self.reading, rows, **self._opts))
        self._size += len(rows)

    @staticmethod
    def _decide(item: NewItem, present: dict[str, str], owners: dict[str, str], now: float) -> AddOutcome | ConflictError:
        """Duplicate (content known), conflict (id names other content) or new; updates the maps."""
        if item.sha256 in present:
            return AddOutcome(id=present[item.sha256], sha256=item.sha256, added=False, vid=-1)
        item_id = item.id or default_id(item.sha256)
        if owners.get(item_id, item.sha256) != item.sha256:
            return ConflictError(f"id {item_id!r} already names other content")
        present[item.sha256], owners[item_id] = item_id, item.sha256
        return AddOutcome(id=item_id, sha256=item.sha256, added=True, vid=-1, created_at=now)

    def _row(self, item: NewItem, item_id: str, blob: str, now: float, caption: str = "",
             created_at: Optional[float] = None) -> dict:
        return {"pk": item.sha256, "item_id": item_id, "uri": item.uri, "blob": blob, "meta": dict(item.metadata),
                "caption": caption, "created_at": created_at or now, "updated_at": now,
                "embedding": np.asarray(item.embedding, np.float32).tolist()}

    def delete(self, item_id: str) -> Optional[Item]:
        with self._gate.write():
            written = self.reading
            try:
                return self._delete(item_id)
            except Exception as exc:
                if not self.in_rename_gap(exc, written):
                    raise
                self.moved_since_write(written)  # NAME names the new generation: delete there
                return self._delete(item_id)

    def _delete(self, item_id: str) -> Optional[Item]:
        rows = self._with_captions(self._query(f"item_id == {literal(item_id)}", ROW_FIELDS), self._level(None)[0])
        if not rows:
            return None
        pks = [r["pk"] for r in rows]
        written = self.reading
        self._call("delete", lambda c: c.delete(written, ids=pks, **self._opts))
        if (moved := self.moved_since_write(written)) is not None:  # switched meanwhile: gone from both generations
            self._call("delete", lambda c: c.delete(moved, ids=pks, **self._opts))
        self._hide(pks)
        for row in rows:
            if row["blob"]:
                self.blobs.unlink(row["blob"])
        try:  # tidiness only: a caption row left behind is never read (it names an item that is gone)
            self._call("delete captions", lambda c: c.delete(self.captions_name, ids=pks, **self._opts))
        except Exception as exc:
            log.warning("caption rows of deleted item %r stay behind: %s", item_id, _message(exc))
        self._size = max(0, self._size - len(rows))
        return _item(rows[0])

    def _hide(self, pks: list[str]) -> None:
        """Hide what this replica deleted from its own reads for recent_delete_s (Session does not cover deletes):
        by id while few, else by reading at Strong."""
        with self._deleted_lock:
            now = time.monotonic()
            self._deleted.update((pk, now) for pk in pks)
            if len(self._deleted) > MAX_HIDDEN_DELETES:
                self._strong_until = now + self.settings.recent_delete_s
                self._deleted.clear()

    def set_captions(self, captions: dict[str, str]) -> None:
        """One caption row per item (never its item row: a Delete racing this cannot be undone by it)."""
        if not captions:
            return
        items = self._query(in_list("item_id", sorted(captions)), ["pk", "item_id", "created_at"])
        now, made_by = time.time(), self._gen_of(self.reading)  # (the generation its models made the caption)
        rows = [{"pk": r["pk"], "caption": _cut(captions[r["item_id"]], self._caption_limit),
                 "item_created_at": r["created_at"], "updated_at": now, "marker": [float(made_by), 0.0]}
                for r in items]
        if rows:
            self._call("store captions", lambda c: c.upsert(self.captions_name, rows, **self._opts))
            self._captions_stored += 1

    def _with_captions(self, rows: list[dict], level: str) -> list[dict]:
        """The item rows with their stored captions (a caption row counts for the item it was made for only)."""
        if not rows:
            return rows
        found = self._call("read captions", lambda c: c.query(
            self.captions_name, filter=in_list("pk", [r["pk"] for r in rows]),
            output_fields=["pk", "caption", "item_created_at"], **self._opts, consistency_level=level))
        made = {c["pk"]: c for c in found}
        for row in rows:
            caption = made.get(row["pk"])
            if caption is not None and caption["item_created_at"] == row["created_at"]:
                row["caption"] = caption["caption"]
        return rows

    # ------------------------------------------------------------ reads
    def get(self, item_id: str, with_embedding: bool = False) -> Optional[Item]:
        rows = self._query(f"item_id == {literal(item_id)}", ROW_FIELDS + (["embedding"] if with_embedding else []))
        return _item(self._with_captions(rows[:1], self._level(None)[0])[0]) if rows else None

    def find_sha(self, sha256: str) -> Optional[Item]:
        rows = self._query(f"pk == {literal(sha256)}", ROW_FIELDS)
        return _item(self._with_captions(rows[:1], self._level(None)[0])[0]) if rows else None

    def read_image(self, item: Item) -> bytes:
        return self.blobs.read_item(item)

    @property
    def size(self) -> int:
        return self._size

    def search(self, query: np.ndarray, k: int, filters: Filter | dict[str, str] | None = None,
               min_score: Optional[float] = None, consistency: Optional[str] = None,
               order: Optional[Order] = None, after: Optional[list] = None) -> list[Hit]:
        if order is not None:
            raise Unsupported(f"ordering hits by {order.field!r}: Milvus 2.3 searches return hits by score only "
                              "(the embedded store orders by fields)")
        return self.filled(self.ranking(query, k, filters, min_score, consistency), consistency)

    def ranking(self, query: np.ndarray, n: int, filters: Filter | dict[str, str] | None = None,
                min_score: Optional[float] = None, consistency: Optional[str] = None) -> list[Hit]:
        """The first `n` hits, their items holding id and sha256 only (RANK_FIELDS): a page at depth d reads
        d + k + 1 hits of which it shows k, so rows and captions are read for the shown ones only (`filled`)."""
        query = check_query(query, self._dim)
        terms, level = self._terms(filters, consistency)
        expression = " and ".join(terms)

        def best(m: int) -> list[Hit]:
            limit = min(m, MAX_TOPK)
            results = self._read("search", lambda c: c.search(
                self.reading, data=[query.tolist()], limit=limit, filter=expression, output_fields=RANK_FIELDS,
                search_params=self._search_params(limit), **self._opts, consistency_level=level))
            hits = [Hit(_ranked_item(r["entity"]), float(r["distance"])) for r in results[0]]
            return [h for h in hits if min_score is None or h.score >= min_score]

        return first_hits(best, n, MAX_TOPK)

    def filled(self, hits: list[Hit], consistency: Optional[str] = None) -> list[Hit]:
        if not hits:
            return hits
        level = self._level(consistency)[0]
        rows = self._with_captions(self._query(in_list("pk", [h.item.sha256 for h in hits]), ROW_FIELDS, level), level)
        items = {row["pk"]: _item(row) for row in rows}
        return [dataclasses.replace(h, item=items[h.item.sha256]) for h in hits if h.item.sha256 in items]

    def keyword_search(self, text: str, k: int, filters: Filter | dict[str, str] | None = None) -> list[Hit]:
        raise Unsupported("keyword search over captions: Milvus 2.3.5 has no full-text index (the embedded "
                          "SQLite + FAISS store has one: --vector-store faiss)")

    def _terms(self, filters: Filter | dict[str, str] | None, level: Optional[str]) -> tuple[list[str], str]:
        """The filter's expression and one hiding what this replica deleted lately, and the level to read at."""
        level, hiding = self._level(level)
        terms = [filter_expression(filters)] if filters else []
        return terms + ([hiding] if hiding else []), level

    def list_items(self, filters: Filter | dict[str, str] | None, order: Optional[Order], after: Optional[list],
                   limit: int, with_embeddings: bool = False, consistency: Optional[str] = None) -> Page:
        """Pages in primary-key (content sha256) order: Milvus answers a query with a limit in that order."""
        if order is not None:
            raise Unsupported(f"listing by {order.field!r}: Milvus 2.3 queries have no order; the Milvus store "
                              "lists in its own stable order (the embedded store orders by fields)")
        if after is not None and not (isinstance(after, list) and len(after) == 1 and isinstance(after[0], str)):
            raise QueryInputError("page_token does not fit this listing")
        terms, level = self._terms(filters, consistency)
        total = self._count(level, " and ".join(terms))
        if after:
            terms.append(f"pk > {literal(after[0])}")
        fields = ROW_FIELDS + (["embedding"] if with_embeddings else [])
        rows = self._read("list", lambda c: c.query(self.reading, filter=" and ".join(terms) or "pk != \"\"",
                                                    output_fields=fields, limit=limit + 1, **self._opts,
                                                    consistency_level=level))
        rows.sort(key=lambda r: r["pk"])
        items = [_item(r) for r in self._with_captions(rows[:limit], level)]
        return Page(items, total, [items[-1].sha256] if len(rows) > limit else None)

    def _count(self, level: str = "Strong", expression: str = "") -> int:
        rows = self._read("count", lambda c: c.query(self.reading, filter=expression, output_fields=["count(*)"],
                                                     **self._opts, consistency_level=level))
        return int(rows[0]["count(*)"]) if rows else 0

    def _recently_deleted(self) -> set[str]:
        with self._deleted_lock:
            horizon = time.monotonic() - self.settings.recent_delete_s
            for pk in [pk for pk, at in self._deleted.items() if at < horizon]:
                del self._deleted[pk]
            return set(self._deleted)

    def _level(self, level: Optional[str]) -> tuple[str, Optional[str]]:
        """The level a read runs at, and the expression term hiding this replica's recent deletes (None when
        there are none, or when the read runs at Strong, which sees every acknowledged delete)."""
        level = level or self.settings.consistency
        hidden = self._recently_deleted()
        if level == "Strong" or time.monotonic() < self._strong_until:
            return "Strong", None
        return level, f"not ({in_list('pk', sorted(hidden))})" if hidden else None

    def stats(self) -> dict:
        info = self._identity() or {}
        self._size = self._count()
        return {
            "count": self._size, "indexed": self._size,
            "index_type": f"milvus:{self.settings.index_type}", "index_active": f"milvus:{self.name}->{self.reading}",
            "model": info.get("model", ""), "pretrained": info.get("pretrained", ""),
            "embedding_dim": int(info.get("embedding_dim", 0)), "last_sequence": 0, "snapshot_sequence": 0,
        }


    # ------------------------------------------------------------ backup and restore (milvus_backup.py)
    def backup(self, out, progress=None):
        """A copy into `out` while writes go on (search_service/milvus_backup.py); blocks."""
        from pathlib import Path

        from .milvus_backup import backup_collection

        return backup_collection(self, Path(out), progress)

    def identity(self) -> Optional[dict]:
        """The model identity the collection is bound to (None: no such collection)."""
        return self._identity()

    def strong_count(self) -> int:
        """Items, read at Strong: Milvus has applied every write acknowledged before this call."""
        return self._count("Strong")

    def pages(self, captions: bool, fields: list[str], size: int) -> Iterator[list[dict]]:
        """Every row of the items' (or the captions') collection through pymilvus's query iterator, `size` a
        page, in primary-key order; each page read anew (at the collection's default level)."""
        name = self.captions_name if captions else self.reading
        rows = self._call("query iterator", lambda c: c.query_iterator(
            name, batch_size=size, output_fields=fields, timeout=float(self.settings.timeout_s)))
        try:
            while page := self._call("query iterator", lambda c: rows.next()):
                yield page
        finally:
            rows.close()

    def row_now(self, pk: str) -> Optional[dict]:
        """An item's row as it is now (Strong), or None."""
        rows = self._read("query", lambda c: c.query(self.reading, filter=f"pk == {literal(pk)}", output_fields=ROW_FIELDS,
                                                     **self._opts, consistency_level="Strong"))
        return rows[0] if rows else None

    def index_settings(self) -> dict:
        """The embedding index as the collection has it: type, metric, build parameters."""
        have = self._describe_indexes(self.reading).get("embedding", {})
        params = {key: have[key] for key in ("M", "efConstruction", "nlist") if key in have}
        return {"index_type": str(have.get("index_type", self.settings.index_type)),
                "metric_type": str(have.get("metric_type", "IP")), "params": params}

    def stored_rows(self) -> int:
        """Rows the collection holds (0 when it does not exist): counted at Strong when it is loaded, else by
        Milvus's statistics (no load needed; they may count deleted rows)."""
        from pymilvus.client.types import LoadState

        def rows(client) -> int:
            if not client.has_collection(self.reading, **self._opts):
                return 0
            if client.get_load_state(self.reading, **self._opts).get("state") == LoadState.Loaded:
                return self._count("Strong")
            return int(client.get_collection_stats(self.reading, **self._opts).get("row_count", 0))

        return self._call("collection statistics", rows)

    def insert_rows(self, rows: list[dict], captions: bool = False) -> None:
        """Insert rows as they are (a restore into a new collection: no checks, no blobs written)."""
        if rows:
            name = self.captions_name if captions else self.reading
            self._call("insert", lambda c: c.insert(name, rows, **self._opts))


class KeyLocks:
    """Locks by name, taken together in one order (callers holding overlapping sets cannot deadlock); a name's
    lock exists while someone holds or waits for it."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[str, list] = {}  # name -> [lock, holders and waiters]

    @contextlib.contextmanager
    def hold(self, names: Iterable[str]) -> Iterator[None]:
        ordered = sorted(set(names))
        with self._guard:
            entries = [self._locks.setdefault(name, [threading.Lock(), 0]) for name in ordered]
            for entry in entries:
                entry[1] += 1
        taken = []
        try:
            for entry in entries:
                entry[0].acquire()
                taken.append(entry)
            yield
        finally:
            for entry in reversed(taken):
                entry[0].release()
            with self._guard:
                for name, entry in zip(ordered, entries):
                    entry[1] -= 1
                    if not entry[1]:
                        del self._locks[name]


def _varchar_limits(described: dict) -> dict[str, int]:
    """Each VARCHAR field's max_length (UTF-8 bytes) in a described collection: the bounds Milvus enforces."""
    return {f["name"]: int(f["params"]["max_length"]) for f in described.get("fields", [])
            if "max_length" in (f.get("params") or {}) and not f.get("is_primary")}


def _json_bytes(value: dict) -> bytes:
    """The JSON value as pymilvus sends it (the bytes Milvus measures)."""
    from pymilvus.client.entity_helper import convert_to_json

    return convert_to_json(value)


def _cut(text: str, limit: int) -> str:
    """The longest prefix of `text` within `limit` UTF-8 bytes (whole characters)."""
    return text.encode()[:limit].decode("utf-8", "ignore")


def _ranked_item(row: dict) -> Item:
    """An item known by id and sha256 only (a ranking's hit, before `filled` reads its row)."""
    return Item(vid=-1, id=row["item_id"], sha256=row["pk"], uri="", blob=None, metadata={}, caption=None,
                created_at=0.0, updated_at=0.0)


def _item(row: dict) -> Item:
    embedding = row.get("embedding")
    return Item(vid=-1, id=row["item_id"], sha256=row["pk"], uri=row["uri"], blob=row["blob"] or None,
                metadata=dict(row["meta"] or {}), caption=row["caption"] or None, created_at=row["created_at"],
                updated_at=row["updated_at"],
                embedding=np.asarray(embedding, np.float32) if embedding is not None else None)


def _message(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc)


def _unreachable(exc: BaseException) -> bool:
    """A connection failure, a timeout, or a collection that is not (yet) loaded: worth retrying later."""
    import grpc

    if isinstance(exc, (grpc.RpcError, ConnectionError, TimeoutError)):
        return True
    text = _message(exc).lower()
    code = getattr(exc, "code", None)
    return code in (1, 2, 101, 106) or any(word in text for word in (
        "connect", "unavailable", "not loaded", "timeout", "deadline", "server", "channel"))
