"""The stages of the Ray Data pipeline, each a batch function (numpy batches: a dict of columns).

  read_and_check   (tasks)  bytes of each item, size cap, header check (format, dimensions, bombs), sha256
  Embedder         (actors, one per Triton endpoint)  skips content the service has; embeds the rest
  Writer           (actors)  AddImages through the service: its validation, idempotency and durability

An item that fails a stage carries `code` (a gRPC status name) and `message` from then on; the later
stages pass it by. Only failures that are not an item's own (Triton or the service unreachable) raise,
which stops the run: run it again to resume.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import ray

from .sources import ItemFailure, read_source

OUTPUT_COLUMNS = ("source", "outcome", "id", "sha256", "code", "message", "skipped")
# Triton requests one embedder keeps open, over all its batches: two encoder batches (it takes up to 16), so
# that the next batch is queued on the server while one runs (with 16, the encoder idled while the answers
# went back and the next requests came)
IMAGES_IN_FLIGHT = 32
BATCHES_AT_ONCE = 2  # batches one embedder works on at once: the next one's requests go out while one ends


@dataclass(frozen=True)
class ServiceTarget:
    """How actors reach the search service (the CLI's connection options)."""

    address: str
    token: Optional[str] = None
    tls_ca: Optional[bytes] = None
    timeout: float = 300.0

    def connect(self):
        from clients.coca_client import Client

        return Client(self.address, token=self.token, tls_ca=self.tls_ca, timeout=self.timeout)


# ---------------------------------------------------------------- read + check + hash (tasks)
def read_and_check(batch: dict, max_bytes: int, max_pixels: int) -> dict:
    """Adds data, sha256, code, message to rows {source, uri, metadata}."""
    from coca import media
    from coca.errors import InvalidInputError

    data, sha, code, message = [], [], [], []
    for source in batch["source"]:
        try:
            content = read_source(str(source), max_bytes)
            media.image_header(content, str(source), max_pixels)
        except ItemFailure as exc:
            content, failure = b"", (exc.code, str(exc))
        except InvalidInputError as exc:  # not an image, corrupt header, too many pixels (bomb)
            content, failure = b"", ("INVALID_ARGUMENT", str(exc))
        else:
            failure = ("", "")
        data.append(content)
        sha.append(hashlib.sha256(content).hexdigest() if content else "")
        code.append(failure[0])
        message.append(failure[1])
    return {**batch, "data": _objects(data), "sha256": _objects(sha), "code": _objects(code),
            "message": _objects(message)}


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# ---------------------------------------------------------------- skip what is stored
def mark_known(client, batch: dict) -> dict:
    """Adds known_id: the id of content the service already holds ("" otherwise): those items are skipped."""
    pending = [i for i, code in enumerate(batch["code"]) if not code]
    known = [""] * len(batch["code"])
    if pending:
        for i, found in zip(pending, client.find_content([batch["sha256"][i] for i in pending])):
            known[i] = found
    return {**batch, "known_id": _objects(known)}


def to_send(batch: dict) -> list[int]:
    """Rows still to be written: no failure, content not stored yet."""
    return [i for i, (code, known) in enumerate(zip(batch["code"], batch["known_id"])) if not code and not known]


# ---------------------------------------------------------------- embed on Triton (actors)
@ray.remote(num_cpus=0)
class EndpointClaims:
    """Hands each embedder actor the Triton endpoint with the fewest embedders (one each, normally)."""

    def __init__(self, endpoints: list[str]):
        self.claims = {endpoint: 0 for endpoint in endpoints}

    def claim(self) -> str:
        endpoint = min(self.claims, key=self.claims.get)
        self.claims[endpoint] += 1
        return endpoint


class Embedder:
    """One Triton endpoint: skips stored content, embeds the rest (one request per image; Triton batches
    them), adds `embedding` (N, dim). A bad image fails alone with Triton's reason.

    BATCHES_AT_ONCE calls run at once (on Ray's threads), their requests on one event loop of the actor's
    and under one limit of IMAGES_IN_FLIGHT: the endpoint always has work queued, also between batches."""

    def __init__(self, claims, service: ServiceTarget, repository_id: str):
        self.endpoint = ray.get(claims.claim.remote())
        self.loop = asyncio.new_event_loop()  # the Triton client lives on this loop for the actor's life
        threading.Thread(target=self.loop.run_forever, daemon=True, name="embedder-loop").start()
        self.triton, self.limit, identity = self._on_loop(self._connect())
        self.service = service.connect()  # a gRPC channel: safe to share between the calls' threads
        self.dim = identity.embed_dim
        if identity.repository_id != repository_id:
            raise RuntimeError(f"Triton at {self.endpoint} serves {identity.model} ({identity.pretrained}) export "
                               f"{identity.repository_id[:16]}, the service's Triton export {repository_id[:16]}")

    def _on_loop(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _connect(self):
        from serving.client import TritonCoca

        triton = TritonCoca(self.endpoint)
        return triton, asyncio.Semaphore(IMAGES_IN_FLIGHT), await triton.identity()

    def __call__(self, batch: dict) -> dict:
        batch = mark_known(self.service, batch)
        rows = to_send(batch)
        vectors = self._on_loop(self._embed([batch["data"][i] for i in rows]))
        embedding = np.zeros((len(batch["code"]), self.dim), np.float32)
        code, message = list(batch["code"]), list(batch["message"])
        for i, vector in zip(rows, vectors):
            if isinstance(vector, ItemFailure):
                code[i], message[i] = vector.code, str(vector)
            else:
                embedding[i] = vector
        return {**batch, "embedding": embedding, "code": _objects(code), "message": _objects(message)}

    async def _embed(self, images: list[bytes]) -> list:
        from coca.errors import InvalidInputError

        async def one(data: bytes):
            async with self.limit:
                try:
                    return (await self.triton.embed_images([data]))[0]
                except InvalidInputError as exc:  # this image's own fault (e.g. truncated): it fails alone
                    return ItemFailure("INVALID_ARGUMENT", str(exc))

        return await asyncio.gather(*(one(data) for data in images))


# ---------------------------------------------------------------- write through the service (actors)
class Writer:
    """AddImages for the rows to send (with their embeddings when the Embedder made them); outputs
    OUTPUT_COLUMNS only (no bytes). `lookup`: skip stored content here (no Embedder stage before).

    BATCHES_AT_ONCE calls run at once (on Ray's threads, one AddImages stream each over the shared channel):
    with one batch at a time the service's model sat idle at the end of every batch while its answers went
    back and the next batch came (measured 13.1 images/s against plain `coca index`'s 14.2)."""

    def __init__(self, service: ServiceTarget, repository_id: str = "", lookup: bool = False):
        self.client = service.connect()
        self.repository_id = repository_id
        self.lookup = lookup

    def __call__(self, batch: dict) -> dict:
        from clients.coca_client import AddItem

        if self.lookup:
            batch = mark_known(self.client, batch)
        n = len(batch["code"])
        out = {"source": batch["source"], "sha256": batch["sha256"], "outcome": _objects(["failed"] * n),
               "id": _objects(list(batch["known_id"])), "code": _objects(list(batch["code"])),
               "message": _objects(list(batch["message"])), "skipped": np.array([bool(k) for k in batch["known_id"]])}
        for i in np.flatnonzero(out["skipped"]):
            out["outcome"][i] = "duplicate"
        rows = to_send(batch)
        embeddings = batch.get("embedding")
        items = [AddItem(image=batch["data"][i], uri=str(batch["uri"][i]), metadata=json.loads(batch["metadata"][i]),
                         embedding=None if embeddings is None else embeddings[i], repository_id=self.repository_id)
                 for i in rows]
        for result in self.client.add(items):
            i = rows[result.index]
            out["outcome"][i] = result.outcome.value
            out["id"][i] = result.id
            if result.error is not None:
                out["code"][i], out["message"][i] = result.error.code.name, result.error.message
        return out
