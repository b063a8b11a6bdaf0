"""The service's view of Triton: per-item outcomes, time limits, several endpoints, typed failures.

All model work goes through serving.pool.TritonPool (one serving.client.TritonCoca per endpoint).
Images are embedded and captioned one Triton request per image, concurrently:
Triton's dynamic batcher (encoders) and sequence batcher (decoder) batch them,
and a bad image fails its own request only.

After a connection failure the next call gets a new client (the failed one is
closed once the calls still on it end), so the service recovers as soon as
Triton is back; with several endpoints the failed one leaves rotation until a
probe finds it back, and the call it cut runs again on another.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, Sequence, TypeVar

import numpy as np

from coca.decoding import Caption
from coca.settings import SamplingParams

log = logging.getLogger("search_service.models")
T = TypeVar("T")


class ModelsUnavailable(Exception):
    """Triton cannot be reached or is not ready; the message says where and why."""


class ModelMismatch(Exception):
    """Triton serves another model than the one the store was built with."""


@dataclass(frozen=True)
class ModelIdentity:
    model: str
    pretrained: str
    embed_dim: int


class TextEmbeddingCache:
    """The last `capacity` text embeddings, least recently used out first (0: no cache).

    A repeated query (a popular search, Classify's label prompts) costs a dict lookup instead of
    a text-tower forward. Valid for one model: the owner clears it when the served model changes.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, text: str) -> Optional[np.ndarray]:
        vector = self._vectors.get(text)
        if vector is None:
            self.misses += 1
            return None
        self.hits += 1
        self._vectors.move_to_end(text)
        return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        self._vectors[text] = vector
        self._vectors.move_to_end(text)
        while len(self._vectors) > self.capacity:
            self._vectors.popitem(last=False)

    def clear(self) -> None:
        self._vectors.clear()

    def stats(self) -> dict:
        return {"query_cache_hits": self.hits, "query_cache_misses": self.misses,
                "query_cache_entries": len(self._vectors)}


class Models:
    """Embeddings and captions from the Triton endpoints in `urls` ("HOST:PORT" or "HOST:PORT,HOST:PORT,...").

    The work is spread over the endpoints by serving.pool.TritonPool (least loaded, a caption pinned
    to one endpoint, a call cut by an endpoint's failure run again once on another); with one
    endpoint it is that server, and a fresh connection after each failure.
    """

    def __init__(self, urls: str, logit_scale: float = 100.0, text_cache_size: int = 4096):
        from serving.pool import TritonPool

        self.pool = TritonPool(urls)
        self.url = str(self.pool)
        self.logit_scale = logit_scale  # Classify's softmax scale (CoCa's learned one is not served)
        self._identity: Optional[ModelIdentity] = None
        self.text_cache = TextEmbeddingCache(text_cache_size)

    def _unavailable(self, exc: BaseException) -> ModelsUnavailable:
        if len(self.pool.endpoints) > 1:
            return ModelsUnavailable(f"model server (Triton) unavailable: {exc}")
        return ModelsUnavailable(f"model server (Triton) at {self.url} is unavailable: {exc}")

    async def _call(self, fn: Callable[..., Awaitable[T]], timeout: float) -> T:
        """Run `fn(client)` on the pool within `timeout` seconds; TritonUnavailableError becomes ModelsUnavailable."""
        return await asyncio.wait_for(self._pooled(fn), timeout)

    async def _pooled(self, fn: Callable[..., Awaitable[T]]) -> T:
        from serving.errors import TritonUnavailableError

        try:
            return await self.pool.call(fn)
        except TritonUnavailableError as exc:
            raise self._unavailable(exc) from None

    async def close(self) -> None:
        await self.pool.close()

    def endpoints(self) -> list:
        """serving.pool.EndpointState of each Triton endpoint."""
        return self.pool.states()

    async def ready(self) -> bool:
        try:
            await self.identity(timeout=5.0, refresh=True)
            return True
        except (ModelsUnavailable, ModelMismatch, asyncio.TimeoutError):
            return False

    async def identity(self, timeout: float = 30.0, refresh: bool = False) -> ModelIdentity:
        """Which model the endpoints serve (asked once while one is healthy, or now with `refresh`)."""
        if not refresh and self.pool.healthy and self._identity is not None:
            return self._identity
        from serving.errors import IdentityMismatchError, TritonUnavailableError

        try:
            found = await self.pool.identity(timeout)
        except IdentityMismatchError as exc:
            raise ModelMismatch(str(exc)) from None
        except TritonUnavailableError as exc:
            raise self._unavailable(exc) from None
        identity = ModelIdentity(found.model, found.pretrained, int(found.embed_dim))
        if self._identity is not None and identity != self._identity:
            self.text_cache.clear()  # its vectors are the old model's
            raise ModelMismatch(f"Triton at {self.url} now serves {identity}, the service started with {self._identity}")
        self._identity = identity
        return identity

    # ------------------------------------------------------------ embeddings
    async def embed_images_each(self, images: Sequence[bytes], timeout: float) -> list:
        """One normalised (D,) vector or one exception per image; ModelsUnavailable is returned, not raised."""
        async def one(client, data):
            return (await client.embed_images([data]))[0]

        return await self._each(one, images, timeout)

    async def embed_texts(self, texts: Sequence[str], timeout: float) -> np.ndarray:
        """(N, D) float32; texts seen recently come from the cache, the others from Triton in one call."""
        found = [self.text_cache.get(text) for text in texts]
        missing = list(dict.fromkeys(t for t, v in zip(texts, found) if v is None))
        if missing:
            async def run(client):
                return await client.embed_texts(missing)

            computed = dict(zip(missing, np.asarray(await self._call(run, timeout), np.float32)))
            for text, vector in computed.items():
                self.text_cache.put(text, vector)
            found = [computed[t] if v is None else v for t, v in zip(texts, found)]
        return np.stack(found) if found else np.zeros((0, 0), np.float32)

    # ------------------------------------------------------------ captions
    async def caption(self, image: bytes, params: SamplingParams, timeout: float) -> Caption:
        async def run(client):
            return await client.caption(image, params)

        return await self._call(run, timeout)

    async def caption_video(self, video: bytes, frames: int, params: SamplingParams, timeout: float) -> Caption:
        async def run(client):
            return await client.caption_video(video, frames=frames, params=params)

        return await self._call(run, timeout)

    async def caption_each(self, images: Sequence[bytes], params: SamplingParams, timeout: float) -> list:
        """Captions of several images at once, one decoder sequence each; one result or exception per image."""
        async def one(client, data):
            return await client.caption(data, params)

        return await self._each(one, images, timeout)

    async def _each(self, fn, items: Sequence, timeout: float) -> list:
        """`fn(client, item)` for each item, each its own pool call (so spread over the endpoints); one
        result or exception per item, ModelsUnavailable included."""
        async def one(item):
            return await self._pooled(lambda client: fn(client, item))

        return list(await asyncio.wait_for(asyncio.gather(*(one(item) for item in items), return_exceptions=True),
                                           timeout))
