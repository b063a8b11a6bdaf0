"""Items in a Milvus collection, bytes in a blob directory: a collection any number of replicas can share.

    coca serve --vector-store milvus --milvus-uri http://HOST:19530 [--milvus-token-file F]
               [--collection NAME] --data BLOB_DIR

The service process keeps no state of its own. One Milvus row per item (schema below); the
collection's description records the model identity (model, pretrained, dim), checked by
every replica that binds to it. Image bytes go to BLOB_DIR/blobs (a local disk for one
replica, a shared mount for several), written and fsynced before the row that names them.

Identity and idempotency: the primary key is the content's sha256 and rows are written with
`upsert`, so the same bytes added twice — retried, or through two replicas at once — are one
item. The id clients see defaults to the first 128 bits of that sha256 (as in the embedded
store). An explicit id is checked against the collection before the write; two replicas
racing to give one new id to two different contents can both succeed (Milvus has no unique
constraint on a non-key field) — the one cross-replica gap, stated here and in README.

Blob files are named `<sha256>.<random>`: each write places its own file and a delete removes
only the file its row named, so no replica can remove another's bytes. A file no row names
(an upsert that lost a race, a crash between placing and writing) is swept once it is older
than `orphan_grace_s`.

Consistency (PLATFORM.md: Bounded misses fresh writes and still shows deletes; Strong costs
~390 ms a search here; Session gives one client its own inserts): reads run at `Session` by
default (a replica sees its own adds at once; others' within Milvus's bounded staleness), and
every read drops ids deleted through this replica in the last `recent_delete_s` seconds (a
delete is not covered by Session in Milvus 2.3). Searches may ask for another level per call
(SearchOptions.consistency); Stats counts at Strong.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import numpy as np

from .blobs import BlobDirectory, discard, fsync_dirs
from .collection import Collection, Hit, Page, StoreUnavailable, Unsupported, check_query, first_hits
from .query import ADDED_AT, Condition, Filter, Order, QueryInputError
from .store import AddOutcome, ConflictError, Item, ModelMismatchError, NewItem, default_id

log = logging.getLogger("search_service.milvus")
T = TypeVar("T")

SCHEMA_VERSION = 1
MAX_ID = 256
MAX_URI = 8192
MAX_CAPTION = 8192
MAX_BLOB_NAME = 256
CONSISTENCY_LEVELS = ("Strong", "Session", "Bounded", "Eventually")
CONNECT_TIMEOUT_S = 2.0
# pymilvus retries a refused connection 75 times (minutes of backoff) unless told otherwise; and it
# bounds retries by `timeout` only when that is an int. A float timeout (the gRPC deadline of each
# attempt) with 2 attempts makes a dead Milvus answer within ~0.1 s, a slow one within the timeout.
RETRY_TIMES = 2
MAX_TOPK = 16384  # Milvus's largest search limit (topk): a tie group deeper than that is cut there
ROW_FIELDS = ["pk", "item_id", "uri", "blob", "meta", "caption", "created_at", "updated_at"]


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


class MilvusCollection(Collection):
    """The Collection over a Milvus collection (see the module docstring)."""

    def __init__(self, blob_root, settings: MilvusSettings):
        self.settings = settings
        self.name = settings.collection
        self.blobs = BlobDirectory(blob_root)
        self._client = None
        self._client_lock = threading.Lock()
        self._dim: Optional[int] = None
        self._open = False
        self._size = 0
        self._deleted: dict[str, float] = {}  # pk -> monotonic time of a delete through this replica
        self._deleted_lock = threading.Lock()

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
        rows = self._call("query", lambda c: c.query(
            self.name, filter=expression, output_fields=fields, **self._opts,
            consistency_level=level or self.settings.consistency))
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
    def is_open(self) -> bool:
        return self._open

    def _identity(self) -> Optional[dict]:
        def describe(client):
            if not client.has_collection(self.name, **self._opts):
                return None
            return client.describe_collection(self.name, **self._opts)

        described = self._call("describe collection", describe)
        if described is None:
            return None
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
            try:
                self._create(wanted)
            except Exception as exc:  # another replica may have made it a moment ago
                have = self._identity()
                if have is None:
                    raise StoreUnavailable(f"cannot create Milvus collection {self.name!r}: {_message(exc)}") from None
            else:
                have = wanted
        if have != wanted:
            raise ModelMismatchError(
                f"Milvus collection {self.name!r} holds embeddings of {have.get('model')} ({have.get('pretrained')}, "
                f"dim {have.get('embedding_dim')}) but the model server has {model} ({pretrained}, dim {dim}); "
                "use another --collection or the same model")
        self._dim = dim

    def _create(self, identity: dict) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                            description=json.dumps(identity, sort_keys=True))
        schema.add_field("pk", DataType.VARCHAR, max_length=64, is_primary=True)  # content sha256
        schema.add_field("item_id", DataType.VARCHAR, max_length=MAX_ID)
        schema.add_field("uri", DataType.VARCHAR, max_length=MAX_URI)
        schema.add_field("blob", DataType.VARCHAR, max_length=MAX_BLOB_NAME)
        schema.add_field("meta", DataType.JSON)
        schema.add_field("caption", DataType.VARCHAR, max_length=MAX_CAPTION)
        schema.add_field("created_at", DataType.DOUBLE)
        schema.add_field("updated_at", DataType.DOUBLE)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=int(identity["embedding_dim"]))
        index = MilvusClient.prepare_index_params()
        index.add_index("embedding", index_type=self.settings.index_type, metric_type="IP",
                        params=self._build_params())
        index.add_index("item_id", index_type="Trie")
        self.client.create_collection(self.name, schema=schema, index_params=index,
                                      consistency_level=self.settings.consistency, **self._opts)

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
        self._call("load collection", lambda c: c.load_collection(self.name, timeout=max(self.settings.timeout_s, 60.0),
                                                                 retry_times=RETRY_TIMES))
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
    def add(self, items: list[NewItem]) -> list[AddOutcome | ConflictError]:
        shas = sorted({item.sha256 for item in items})
        present = {r["pk"]: r["item_id"] for r in self._query(in_list("pk", shas), ["pk", "item_id"])}
        wanted_ids = sorted({item.id or default_id(item.sha256) for item in items})
        owners = {r["item_id"]: r["pk"] for r in self._query(in_list("item_id", wanted_ids), ["pk", "item_id"])}
        outcomes: list[AddOutcome | ConflictError] = []
        rows, placed, now = [], [], time.time()
        try:
            for item in items:
                outcome = self._decide(item, present, owners, now)
                outcomes.append(outcome)
                if isinstance(outcome, AddOutcome) and outcome.added:
                    blob = ""
                    if item.data is not None:
                        name = f"{item.sha256}.{secrets.token_hex(6)}"
                        placed.append(self.blobs.place(self.blobs.stage(item.data), name))
                        blob = self.blobs.relative(name)
                    rows.append(self._row(item, outcome.id, blob, now))
            fsync_dirs(placed)  # the bytes are durable before the rows that name them
            if rows:
                self._call("upsert", lambda c: c.upsert(self.name, rows, **self._opts))
        except BaseException:
            for path in placed:
                discard(path)
            raise
        with self._deleted_lock:
            for row in rows:
                self._deleted.pop(row["pk"], None)
        self._size += len(rows)
        return outcomes

    def bulk_insert(self, items: list[NewItem]) -> None:
        """Load items known to be new (no duplicate checks, no blobs): for benchmarks and bulk loaders that
        deduplicate themselves. `add` is the checked path."""
        now = time.time()
        rows = [self._row(item, item.id or default_id(item.sha256), "", now) for item in items]
        self._call("insert", lambda c: c.insert(self.name, rows, **self._opts))
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
        rows = self._query(f"item_id == {literal(item_id)}", ROW_FIELDS)
        if not rows:
            return None
        pks = [r["pk"] for r in rows]
        self._call("delete", lambda c: c.delete(self.name, ids=pks, **self._opts))
        with self._deleted_lock:
            now = time.monotonic()
            self._deleted.update((pk, now) for pk in pks)
        for row in rows:
            if row["blob"]:
                self.blobs.unlink(row["blob"])
        self._size = max(0, self._size - len(rows))
        return _item(rows[0])

    def set_captions(self, captions: dict[str, str]) -> None:
        if not captions:
            return
        rows = self._query(in_list("item_id", sorted(captions)), ROW_FIELDS + ["embedding"])
        now = time.time()
        for row in rows:
            row["caption"], row["updated_at"] = captions[row["item_id"]][:MAX_CAPTION], now
        if rows:
            self._call("upsert captions", lambda c: c.upsert(self.name, rows, **self._opts))

    # ------------------------------------------------------------ reads
    def get(self, item_id: str, with_embedding: bool = False) -> Optional[Item]:
        rows = self._query(f"item_id == {literal(item_id)}", ROW_FIELDS + (["embedding"] if with_embedding else []))
        return _item(rows[0]) if rows else None

    def find_sha(self, sha256: str) -> Optional[Item]:
        rows = self._query(f"pk == {literal(sha256)}", ROW_FIELDS)
        return _item(rows[0]) if rows else None

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
        query = check_query(query, self._dim)
        expression = " and ".join(self._terms(filters))
        level = consistency or self.settings.consistency

        def best(n: int) -> list[Hit]:
            limit = min(n, MAX_TOPK)
            results = self._call("search", lambda c: c.search(
                self.name, data=[query.tolist()], limit=limit, filter=expression, output_fields=ROW_FIELDS,
                search_params=self._search_params(limit), **self._opts, consistency_level=level))
            hits = [Hit(_item(r["entity"]), float(r["distance"])) for r in results[0]]
            return [h for h in hits if min_score is None or h.score >= min_score]

        return first_hits(best, k)

    def keyword_search(self, text: str, k: int, filters: Filter | dict[str, str] | None = None) -> list[Hit]:
        raise Unsupported("keyword search over captions: Milvus 2.3.5 has no full-text index (the embedded "
                          "SQLite + FAISS store has one: --vector-store faiss)")

    def _terms(self, filters: Filter | dict[str, str] | None) -> list[str]:
        """The filter's expression, and one hiding what this replica deleted lately."""
        terms = [filter_expression(filters)] if filters else []
        hidden = sorted(self._recently_deleted())
        if hidden:
            terms.append(f"not ({in_list('pk', hidden)})")
        return terms

    def list_items(self, filters: Filter | dict[str, str] | None, order: Optional[Order], after: Optional[list],
                   limit: int, with_embeddings: bool = False, consistency: Optional[str] = None) -> Page:
        """Pages in primary-key (content sha256) order: Milvus answers a query with a limit in that order."""
        if order is not None:
            raise Unsupported(f"listing by {order.field!r}: Milvus 2.3 queries have no order; the Milvus store "
                              "lists in its own stable order (the embedded store orders by fields)")
        if after is not None and not (isinstance(after, list) and len(after) == 1 and isinstance(after[0], str)):
            raise QueryInputError("page_token does not fit this listing")
        terms = self._terms(filters)
        level = consistency or self.settings.consistency
        total = self._count(level, " and ".join(terms))
        if after:
            terms.append(f"pk > {literal(after[0])}")
        fields = ROW_FIELDS + (["embedding"] if with_embeddings else [])
        rows = self._call("list", lambda c: c.query(self.name, filter=" and ".join(terms) or "pk != \"\"",
                                                    output_fields=fields, limit=limit + 1, **self._opts,
                                                    consistency_level=level))
        rows.sort(key=lambda r: r["pk"])
        items = [_item(r) for r in rows[:limit]]
        return Page(items, total, [items[-1].sha256] if len(rows) > limit else None)

    def _count(self, level: str = "Strong", expression: str = "") -> int:
        rows = self._call("count", lambda c: c.query(self.name, filter=expression, output_fields=["count(*)"],
                                                     **self._opts, consistency_level=level))
        return int(rows[0]["count(*)"]) if rows else 0

    def _recently_deleted(self) -> set[str]:
        with self._deleted_lock:
            horizon = time.monotonic() - self.settings.recent_delete_s
            for pk in [pk for pk, at in self._deleted.items() if at < horizon]:
                del self._deleted[pk]
            return set(self._deleted)

    def stats(self) -> dict:
        info = self._identity() or {}
        self._size = self._count()
        return {
            "count": self._size, "indexed": self._size,
            "index_type": f"milvus:{self.settings.index_type}", "index_active": f"milvus:{self.name}",
            "model": info.get("model", ""), "pretrained": info.get("pretrained", ""),
            "embedding_dim": int(info.get("embedding_dim", 0)), "last_sequence": 0, "snapshot_sequence": 0,
        }


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
