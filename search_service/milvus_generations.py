"""Model generations of a Milvus collection: one physical collection per generation behind the service's alias.

    --collection NAME   an alias -> NAME_g<k>  (the generation that answers; every replica reads through it)
                        NAME_rollback -> NAME_g<j>  (the generation kept for rollback, until DROP_OLD)
                        NAME_captions  (captions: keyed by content, shared by every generation)

A new collection is made as NAME_g0 with NAME its alias. A collection made before aliases (a plain collection
called NAME) is generation 0 as it is; Milvus 2.3 refuses an alias named like a collection (error 1601), so its
first switch renames it to NAME_g0 (rename_collection keeps it loaded) and creates the alias NAME at once
after: between those two calls (a few ms) NAME names nothing, and reads fail as "collection not found". A
replica that starts in that gap (or after a crash in it) points NAME back at NAME_g0 (`recover_alias`).

State lives in Milvus itself, so a killed service resumes with what is there: the alias names the active
generation, NAME_rollback the old one, and a NAME_g<k> named by neither is being built. Each generation's
weights (the export's repository id) and Triton endpoints are collection properties (coca.weights,
coca.triton), written when a reindex begins. The reindex (search_service/reindex.py, shared with the embedded
store) fills the generation being built from the active one: a live row lacks its copy there until one with
the same content and created_at is upserted (re-embedded from its stored bytes), so progress survives a kill.
The switch, under this replica's write gate (no add or delete through it runs meanwhile): it fences the active
collection (the property coca.switching: until when), then every active row has its copy (else None: fill
again), rows deleted since they were copied are deleted from the new one, then the rollback alias names the
active collection and `alter_alias` points NAME at the new one.

Other replicas' writes: each add and delete, once committed, asks NAME again (`moved_since_write`). A write
committed before the fence is in the switch's reads (at Strong); one committed after it sees the fence (or the
moved alias), waits until the switch flips or gives up, and, flipped, is made again in the new generation (an
add re-embedded by the new model: GenerationChanged with what it committed; a delete repeated there).

Every replica reads and writes the collection of the generation it answers from (`reading`) and follows the
alias (`refresh_generation`, once a second at most: SearchServicer follows with the models of the generation it
names; before every AddImages commit too), so no replica ranks one model's vectors with another's query. Deletes
follow it as above. Bounds: the switch reads every row's (pk, created_at) of both collections at Strong
(MAX_TOPK a query) within FENCE_S (less CLOCK_SKEW_S; else it lifts the fence and fills again); a write elsewhere
waits for a switch at most that long. Replicas' clocks must agree within CLOCK_SKEW_S.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from typing import Iterator, Optional

import numpy as np

from .collection import StoreUnavailable
from .generations import Generation
from .store import Item

ROLLBACK_SUFFIX = "_rollback"
WEIGHTS, TRITON = "coca.weights", "coca.triton"
SWITCHING = "coca.switching"  # on the answering collection while a switch reads it: until when (unix seconds)
FENCE_S = 60.0  # a switch's reads and flip, from its fence on; writes through other replicas wait at most this
CLOCK_SKEW_S = 5.0  # how far replicas' clocks may differ: a switch flips no later than this before its fence ends
WRITE_RECHECK_S = 0.05  # how often a write committed under a fence asks whether the switch is done
COLLECTION_NOT_FOUND = 100  # Milvus's error code
CAPTION_COUNT_S = 30.0  # how long Stats.captions_by_old_models is kept (counting reads every caption row)

log = logging.getLogger(__name__)


class WriteGate:
    """Writes pass together; a switch waits for those under way and holds new ones back until it is done."""

    def __init__(self):
        self._turn = threading.Condition()
        self._writers = 0
        self._switching = False

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._turn:
            self._turn.wait_for(lambda: not self._switching)
            self._writers += 1
        try:
            yield
        finally:
            with self._turn:
                self._writers -= 1
                self._turn.notify_all()

    @contextlib.contextmanager
    def switch(self) -> Iterator[None]:
        with self._turn:
            self._turn.wait_for(lambda: not self._switching)
            self._switching = True
            self._turn.wait_for(lambda: self._writers == 0)
        try:
            yield
        finally:
            with self._turn:
                self._switching = False
                self._turn.notify_all()


class MilvusGenerations:
    """The generation operations of MilvusCollection (the Reindex RPC's store side; see the module docstring).
    Needs of its host: name, settings, captions_name, reading, _call, _opts, _hide, _identity, _item_schema,
    _create_collection, _ensure_indexes, _load."""

    generation: Optional[int] = 0  # the generation reads answer from; None while the alias moves
    _caption_count: Optional[tuple] = None  # (active generation, _captions_stored, good until, count)
    _captions_stored = 0  # caption writes through this replica (a count read before one is stale)

    # ------------------------------------------------------------ names
    def generation_name(self, gen: int) -> str:
        return f"{self.name}_g{gen}"

    @property
    def rollback_alias(self) -> str:
        return self.name + ROLLBACK_SUFFIX

    def _gen_of(self, physical: str) -> int:
        found = re.fullmatch(re.escape(self.name) + r"_g(\d+)", physical)
        return int(found[1]) if found else 0  # the plain collection NAME (made before aliases) is generation 0

    def _resolve(self, name: str) -> Optional[str]:
        """The collection `name` reaches (an alias's target, or `name` when it is a collection), or None.
        (describe_collection, not describe_alias: pymilvus logs an ERROR for every alias that is not found.)"""
        described = self._call("describe collection", lambda c: self._described(c, name))
        return None if described is None else described["collection_name"]

    def _described(self, client, name: str) -> Optional[dict]:
        """describe_collection of `name`, or None when it names nothing. Not found by describe after has_collection
        found it is a first switch renaming NAME between the two calls (the rename gap): None too. (Seen as an add
        and a delete answered INTERNAL "collection not found" through another replica, 1 in ~10 runs of the
        write-gap test.)"""
        if not client.has_collection(name, **self._opts):
            return None
        try:
            return client.describe_collection(name, **self._opts)
        except Exception as exc:
            if getattr(exc, "code", None) == COLLECTION_NOT_FOUND:
                return None
            raise

    def _alias_target(self, alias: str) -> Optional[str]:
        target = self._resolve(alias)
        return target if target != alias else None

    def answering_collection(self) -> Optional[str]:
        """The physical collection NAME reads from now (NAME itself when it is a plain collection), or None."""
        return self._resolve(self.name)

    def create_aliased(self, schema) -> None:
        """A new collection: NAME_g0 with NAME its alias (replicas doing this at once: each call is a no-op or
        fails because the other's is there, then the alias is what they both wanted)."""
        physical = self.generation_name(0)
        self._create_collection(physical, schema)
        self._point_alias(self.name, physical)

    def recover_alias(self) -> None:
        """NAME names nothing but the rollback alias names a generation: a first switch stopped between renaming
        NAME and making it an alias. NAME answers from that generation again (the new one is resumed)."""
        kept = self._alias_target(self.rollback_alias)
        if kept is not None:
            self._point_alias(self.name, kept)

    def _point_alias(self, alias: str, physical: str) -> None:
        def point(client) -> None:
            if self._alias_target(alias) is None:
                try:
                    client.create_alias(physical, alias, **self._opts)
                    return
                except Exception:
                    if self._alias_target(alias) is None:  # not made by another replica meanwhile
                        raise
            client.alter_alias(physical, alias, **self._opts)

        self._call(f"alias {alias} -> {physical}", point)

    # ------------------------------------------------------------ records
    def generation_records(self) -> dict[str, Generation]:
        """The generations by state: 'active' once its weights are recorded (a first reindex records them),
        'old' (kept for rollback), 'building'."""
        active = self.answering_collection()
        if active is None:
            return {}
        old = self._alias_target(self.rollback_alias)
        pattern = re.compile(re.escape(self.name) + r"_g\d+")
        names = {n for n in self._call("list collections", lambda c: c.list_collections(**self._opts))
                 if pattern.fullmatch(n)} | {active}
        records = {}
        for physical in sorted(names, key=self._gen_of):
            state = "active" if physical == active else "old" if physical == old else "building"
            record = self._record(physical, state)
            if record.weights or state != "active":
                records[state] = record
        return records

    def _record(self, physical: str, state: str) -> Generation:
        described = self._call("describe collection", lambda c: c.describe_collection(physical, **self._opts))
        identity = _description(described)
        properties = described.get("properties") or {}
        return Generation(self._gen_of(physical), identity.get("model", ""), identity.get("pretrained", ""),
                          int(identity.get("embedding_dim", 0)), properties.get(WEIGHTS, ""),
                          properties.get(TRITON, ""), state)

    def begin_generation(self, active: Generation, target: Generation) -> Generation:
        """Record the active generation's weights, and make (or go on with) the collection `target` is built
        in: the one being built when it holds the same weights, else a new one (another being built is dropped)."""
        from pymilvus.client.types import LoadState

        answering = self.answering_collection()
        self._set_properties(answering, active)
        records = self.generation_records()
        building = records.get("building")
        if building is not None and building.weights == target.weights:
            target.gen = building.gen
        else:
            if building is not None:
                self._drop(self.generation_name(building.gen))
            target.gen = max([r.gen for r in records.values()] + [self._gen_of(answering)]) + 1
            identity = {"coca_schema": self._identity()["coca_schema"], "model": target.model,
                        "pretrained": target.pretrained, "embedding_dim": target.embedding_dim}
            self._create_collection(self.generation_name(target.gen), self._item_schema(identity))
        physical = self.generation_name(target.gen)
        self._set_properties(physical, target)
        # (again on a resume: a kill may have come before its indexes or its load)
        if self._ensure_indexes(physical) != LoadState.Loaded:
            self._load(physical)
        return target

    def _set_properties(self, physical: str, generation: Generation) -> None:
        self._call("collection properties", lambda c: c.alter_collection_properties(
            physical, {WEIGHTS: generation.weights, TRITON: generation.triton}, **self._opts))

    def _drop(self, physical: str) -> None:
        def drop(client) -> None:
            with contextlib.suppress(Exception):  # not loaded: nothing to release
                client.release_collection(physical, **self._opts)
            client.drop_collection(physical, **self._opts)

        self._call(f"drop collection {physical}", drop)

    # ------------------------------------------------------------ filling (reindex.fill)
    def generation_lacking(self, gen: int, after: Optional[str], limit: int) -> tuple[list[Item], Optional[str]]:
        """Live rows after pk `after` (in pk order) whose copy in generation `gen` is missing or of an earlier
        add of the same content (another created_at); and the pk to go on after."""
        from .milvus import ROW_FIELDS, _item, in_list, literal

        source, target = self.reading, self.generation_name(gen)
        after = after or ""
        while True:
            rows = self._call("reindex read", lambda c: c.query(
                source, filter=f"pk > {literal(after)}", output_fields=ROW_FIELDS, limit=limit, **self._opts,
                consistency_level=self.settings.consistency))
            if not rows:
                return [], after
            rows.sort(key=lambda r: r["pk"])
            after = rows[-1]["pk"]
            copied = {r["pk"]: r["created_at"] for r in self._call("reindex read", lambda c: c.query(
                target, filter=in_list("pk", [r["pk"] for r in rows]), output_fields=["pk", "created_at"],
                **self._opts, consistency_level=self.settings.consistency))}
            lacking = [_item(r) for r in rows if copied.get(r["pk"]) != r["created_at"]]
            if lacking:
                return lacking, after

    def generation_embedded(self, gen: int) -> int:
        target = self.generation_name(gen)
        rows = self._call("count", lambda c: c.query(target, filter="", output_fields=["count(*)"], **self._opts,
                                                         consistency_level=self.settings.consistency))
        return int(rows[0]["count(*)"]) if rows else 0

    def put_generation(self, gen: int, items: list[Item], vectors: np.ndarray) -> None:
        """Upsert the items' rows, with their new vectors, into generation `gen`'s collection."""
        rows = [{"pk": i.sha256, "item_id": i.id, "uri": i.uri, "blob": i.blob or "", "meta": dict(i.metadata),
                 "caption": i.caption or "", "created_at": i.created_at, "updated_at": i.updated_at,
                 "embedding": np.asarray(v, np.float32).tolist()} for i, v in zip(items, vectors)]
        self._call("reindex write", lambda c: c.upsert(self.generation_name(gen), rows, **self._opts))

    # ------------------------------------------------------------ switch, drop
    def switch_generation(self, gen: int, dim: int) -> Optional[Generation]:
        """Point NAME at generation `gen` (see the module docstring); None while an active row lacks its copy."""
        target = self.generation_name(gen)
        with self._gate.switch():
            source = self.answering_collection()
            fence_ends = time.time() + FENCE_S
            self._set_fence(source, fence_ends)
            try:
                live, copied = self._keys(source), self._keys(target)
                if any(copied.get(pk) != created for pk, created in live.items()):
                    return None
                gone = [pk for pk in copied if pk not in live]  # deleted since they were copied
                self._delete_rows(target, gone)
                self._hide(gone)  # (reads at Bounded would see them for a while)
                if time.time() > fence_ends - CLOCK_SKEW_S:  # writers elsewhere may have stopped waiting
                    log.warning("switch to %s: reading both collections took over %.0f s; filling again", target,
                                FENCE_S - CLOCK_SKEW_S)
                    return None
                answering, self.generation = self.generation, None  # searches meanwhile wait (or retry)
                try:
                    source = self._flip(source, target)
                except BaseException:
                    self.generation = answering
                    raise
                self.generation, self._dim, self._physical = gen, dim, target
            finally:
                self._lift_fence(source)
        return self._record(target, "active")

    def _set_fence(self, physical: str, until: float) -> None:
        self._call("switch fence", lambda c: c.alter_collection_properties(
            physical, {SWITCHING: repr(until)}, **self._opts))

    def _lift_fence(self, physical: str) -> None:
        try:
            self._set_fence(physical, 0.0)
        except Exception as exc:  # it ends by itself at its time: writes elsewhere wait until then
            log.warning("the switch fence on %s stays until it ends: %s", physical, exc)

    def in_rename_gap(self, exc: Exception, written: str) -> bool:
        """Whether `exc` is a call to the plain collection NAME refused as not found: a first switch renamed it,
        and the alias NAME follows in a few ms (`named_again` waits for it)."""
        return written == self.name and (getattr(exc, "code", None) == COLLECTION_NOT_FOUND
                                         or "collection not found" in str(exc).lower())

    def named_again(self) -> str:
        """The collection NAME reaches, once a first switch's rename gap is over (FENCE_S at most)."""
        give_up = time.monotonic() + FENCE_S + CLOCK_SKEW_S
        while (found := self._resolve(self.name)) is None:
            if time.monotonic() > give_up:
                raise StoreUnavailable(f"Milvus collection {self.name!r} names nothing: a model generation switch "
                                       f"renamed it and did not make it an alias within {FENCE_S:.0f} s")
            time.sleep(WRITE_RECHECK_S)
        return found

    def moved_since_write(self, written: str) -> Optional[str]:
        """After an add or delete committed to collection `written`: None when NAME still answers from it and no
        switch is reading it; else the collection NAME answers from now (the write must be made there too).
        Waits out a switch under way (its reads may have missed the write), FENCE_S at most."""
        give_up = time.monotonic() + FENCE_S + CLOCK_SKEW_S
        while True:
            described = self._call("describe collection", lambda c: self._described(c, self.name))
            if described is not None:  # (else a first switch is between its rename and its alias: a few ms)
                if described["collection_name"] != written:
                    return described["collection_name"]
                if float((described.get("properties") or {}).get(SWITCHING) or 0) <= time.time():
                    return None
            if time.monotonic() > give_up:
                raise StoreUnavailable(f"a model generation switch of Milvus collection {self.name!r} did not end "
                                       f"within {FENCE_S:.0f} s of its start; this write may have to be made again")
            time.sleep(WRITE_RECHECK_S)

    def _delete_rows(self, physical: str, pks: list[str]) -> None:
        for start in range(0, len(pks), 1000):
            self._call("reindex delete", lambda c: c.delete(physical, ids=pks[start:start + 1000], **self._opts))

    def refresh_generation(self) -> Optional[int]:
        """Follow NAME (switched through another replica): the generation it names now, which this replica reads
        and writes from now on (its service follows with that generation's models); None while switching here."""
        with self._gate.write():  # not between a switch's reads and its flip
            if self.generation is None:
                return None
            physical = self.answering_collection()
            if physical is not None and physical != self._physical:
                self._physical, self.generation, self._dim = physical, self._gen_of(physical), None
                self._dim = self.dim  # the new generation's (read from its collection)
            return self.generation

    def _keys(self, physical: str) -> dict[str, float]:
        """Every row's pk -> created_at, read at Strong (every acknowledged write is in)."""
        return {pk: row["created_at"] for pk, row in self._every_row(physical, ["created_at"]).items()}

    def _every_row(self, physical: str, fields: list[str]) -> dict[str, dict]:
        """Every row's `fields` by pk, read at Strong (MAX_TOPK a query)."""
        from .milvus import MAX_TOPK, literal

        found, after = {}, ""
        while True:
            rows = self._call("read every row", lambda c: c.query(
                physical, filter=f"pk > {literal(after)}", output_fields=["pk", *fields], limit=MAX_TOPK,
                timeout=float(self.settings.timeout_s), consistency_level="Strong"))
            found.update((r["pk"], r) for r in rows)
            if len(rows) < MAX_TOPK:
                return found
            after = max(r["pk"] for r in rows)

    # ------------------------------------------------------------ captions
    def captions_by_old_models(self) -> int:
        """Captions of live items made by another generation's decoder than the active one's (the caption row's
        marker names it). Reads every caption row: counted once per CAPTION_COUNT_S at most (again after a
        caption stored through this replica or a switch)."""
        from .milvus import in_list

        active = self._gen_of(self.reading)
        cached = self._caption_count
        if cached is not None and cached[:2] == (active, self._captions_stored) and time.monotonic() < cached[2]:
            return cached[3]
        stored, started = self._captions_stored, time.monotonic()
        made_for = {pk: row["item_created_at"] for pk, row in
                    self._every_row(self.captions_name, ["item_created_at", "marker"]).items()
                    if round(float(row["marker"][0])) != active}
        pks, count = sorted(made_for), 0
        for start in range(0, len(pks), 1000):
            rows = self._call("count captions", lambda c: c.query(
                self.reading, filter=in_list("pk", pks[start:start + 1000]), output_fields=["pk", "created_at"],
                **self._opts, consistency_level="Strong"))
            count += sum(made_for[r["pk"]] == r["created_at"] for r in rows)  # (a caption of a later re-add: no)
        self._caption_count = (active, stored, started + CAPTION_COUNT_S, count)
        return count

    def _flip(self, source: str, target: str) -> str:
        """The rollback alias to `source` (an older kept generation dropped), then NAME to `target`; the name
        `source` has now (renamed when it was the plain collection NAME)."""
        kept = self._alias_target(self.rollback_alias)
        if kept is not None and kept not in (source, target):
            self._call("drop alias", lambda c: c.drop_alias(self.rollback_alias, **self._opts))
            self._drop(kept)
        if source == self.name:  # a collection made before aliases: Milvus refuses an alias of its name
            source = self.generation_name(0)
            self._call("rename collection", lambda c: c.rename_collection(self.name, source, **self._opts))
        self._point_alias(self.rollback_alias, source)
        self._point_alias(self.name, target)
        return source

    def drop_old_generation(self) -> Optional[int]:
        """Drop the generation kept for rollback; which one (None when none is kept)."""
        kept = self._alias_target(self.rollback_alias)
        if kept is None or kept == self.answering_collection():
            return None
        self._call("drop alias", lambda c: c.drop_alias(self.rollback_alias, **self._opts))
        self._drop(kept)
        return self._gen_of(kept)

    def drop_all(self) -> None:
        """Drop NAME with every generation, both aliases and the captions (tests and benches tidying up)."""
        pattern = re.compile(re.escape(self.name) + r"(_g\d+)?")
        for alias in (self.name, self.rollback_alias):
            self._call("drop alias", lambda c: c.drop_alias(alias, **self._opts))
        for physical in self._call("list collections", lambda c: c.list_collections(**self._opts)):
            if pattern.fullmatch(physical) or physical == self.captions_name:
                self._drop(physical)


def _description(described: dict) -> dict:
    import json

    try:
        return json.loads(described.get("description") or "{}")
    except ValueError:
        return {}
