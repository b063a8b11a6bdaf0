"""The service's view of Triton: per-item outcomes, time limits, several endpoints, typed failures.

All model work goes through serving.pool.TritonPool (one serving.client.TritonCoca per endpoint).
Images are embedded and captioned one Triton request per image, concurrently:
Triton's dynamic batcher (encoders) and sequence batcher (decoder) batch them,
and a bad image fails its own request only.

After a connection failure the next call gets a new client (the failed one is
closed once the calls still on it end), so the service recovers as soon as
Triton is back; with several endpoints the failed one leaves rotation until a
probe finds it back, and the call it cut runs again on another.

Which model and weights Triton serves is asked again when the last answer is older than
IDENTITY_MAX_AGE_S (counted from when it arrived) or no endpoint is in rotation, and whenever a caller
wants it fresh (health, Stats, and each AddImages batch before it commits): a Triton restarted with
other weights is noticed, never mixed into the store.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Optional, Sequence, TypeVar, Union

import numpy as np

from coca import media
from coca.captions import Caption
from coca.settings import SamplingParams

if TYPE_CHECKING:
    from serving.client import Generation

log = logging.getLogger("search_service.models")
T = TypeVar("T")
IDENTITY_MAX_AGE_S = 2.0  # an identity older than this is asked again before it is relied on


class ModelsUnavailable(Exception):
    """Triton cannot be reached or is not ready; the message says where and why."""


class ModelMismatch(Exception):
    """Triton serves another model than the one the store was built with."""


@dataclass(frozen=True)
class ModelIdentity:
    model: str
    pretrained: str
    embed_dim: int
    weights: str  # the export's repository id: a hash of all the weights (equal ids, equal weights)
    precision: str = field(default="", compare=False)  # what `coca export` chose (serving.protocol.Identity)

    def __str__(self) -> str:
        return f"{self.model} ({self.pretrained}, dim {self.embed_dim}, weights {self.weights[:12]})"


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

    The work is spread over the endpoints by serving.pool.TritonPool (least loaded, a caption's decoder
    sequence on one endpoint, a call or caption cut by an endpoint's failure run again once on another); with one
    endpoint it is that server, and a fresh connection after each failure. `observe(model, seconds, ok)`
    is told of each Triton infer call (the metrics).
    """

    def __init__(self, urls: str, logit_scale: float = 100.0, text_cache_size: int = 4096, observe=None):
        from serving.pool import TritonPool

        self.pool = TritonPool(urls, observe=observe)
        self.url = str(self.pool)
        self.logit_scale = logit_scale  # Classify's softmax scale (CoCa's learned one is not served)
        self._verified: Optional[tuple[ModelIdentity, float]] = None  # the last answer, and when it came
        self.text_cache = TextEmbeddingCache(text_cache_size)
        self.observe = observe

    def like(self, urls: str) -> "Models":
        """Models of other endpoints (another model's: a reindex), set up as this one."""
        return Models(urls, self.logit_scale, self.text_cache.capacity, observe=self.observe)

    @property
    def endpoints_spec(self) -> str:
        """The endpoints as --triton takes them."""
        return ",".join(self.pool.urls)

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

    @property
    def precision(self) -> str:
        """The precision the served export says it computes in, as last heard ("" before any answer)."""
        return self._verified[0].precision if self._verified is not None else ""

    async def identity(self, timeout: float, fresh: bool = False) -> ModelIdentity:
        """Which model and weights the endpoints serve: asked now if `fresh`, while no endpoint is in
        rotation, or when the last answer is older than IDENTITY_MAX_AGE_S (serving.pool asks those in
        rotation, each within its probe timeout); ModelsUnavailable (or a timeout) when none answers,
        ModelMismatch when endpoints serve different exports."""
        if not fresh and self.pool.healthy and self._verified is not None:
            identity, when = self._verified
            if time.monotonic() - when < IDENTITY_MAX_AGE_S:
                return identity
        from serving.errors import IdentityMismatchError, TritonUnavailableError

        try:
            found = await self.pool.identity(timeout)
        except IdentityMismatchError as exc:
            raise ModelMismatch(str(exc)) from None
        except TritonUnavailableError as exc:
            raise self._unavailable(exc) from None
        identity = ModelIdentity(found.model, found.pretrained, int(found.embed_dim), found.repository_id,
                                 found.precision)
        if self._verified is not None and identity != self._verified[0]:
            self.text_cache.clear()  # its vectors are the old model's
        self._verified = (identity, time.monotonic())  # its age counts from the answer, not the question
        return identity

    # ------------------------------------------------------------ embeddings
    async def embed_images_each(self, images: Sequence[bytes], timeout: float) -> list:
        """One normalised (D,) vector or one exception per image; ModelsUnavailable is returned, not raised."""
        async def one(client, data):
            return (await client.embed_images([data]))[0]

        return await self._each(one, images, timeout)

    async def encode_frames(self, frames: Sequence[bytes], image_embeddings: bool,
                            timeout: float) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """A video's sampled frames (encoded images) in one pool call: their ClassEmbeddings (N, D), and their
        ImageEmbeddings (N, T, W) when asked (None otherwise)."""
        outputs = ["CLASS_EMBEDDING", "IMAGE_EMBEDDINGS"] if image_embeddings else ["CLASS_EMBEDDING"]

        async def run(client):
            return await client.encode_images(frames, outputs, batch_size=max(1, len(frames)))

        found = await self._call(run, timeout)
        return found["CLASS_EMBEDDING"], found.get("IMAGE_EMBEDDINGS")

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
    async def caption(self, image: Union[bytes, np.ndarray], params: SamplingParams, timeout: float) -> Caption:
        """The caption of image bytes, or of ImageEmbeddings (a video's: video_embeddings)."""
        async def run(client):
            return await client.caption(image, params)

        return await self._call(run, timeout)

    def capacity_source(self) -> tuple:
        """What the decoders' capacity depends on: the served identity, and the endpoints in rotation each on
        its connection (a restarted server is reached on a new one: its capacity may differ)."""
        identity = self._verified[0] if self._verified is not None else None
        return identity, tuple((e.url, e.generation) for e in self.pool.endpoints if e.healthy)

    async def decoder_capacity(self, timeout: float) -> tuple[int, tuple]:
        """The KV-cache rows the decoders hold at once, summed over the endpoints in rotation (each its
        `capacity_rows`), and the capacity_source it was read from; ModelsUnavailable when one does not say
        (asked again later: the caller keeps the bound it had)."""
        from serving.errors import TritonUnavailableError
        from serving.protocol import TEXT_DECODER

        async def rows(client) -> int:
            config = await client.client.get_model_config(TEXT_DECODER, as_json=True)
            return int(config["config"]["parameters"]["capacity_rows"]["string_value"])

        source = self.capacity_source()  # before asking: a change meanwhile makes it stale, read again
        rotation = [e for e in self.pool.endpoints if e.healthy]
        if not rotation:
            raise self._unavailable(TritonUnavailableError("no endpoint in rotation"))
        answers = await asyncio.wait_for(asyncio.gather(*(e.run(rows, counted=False) for e in rotation),
                                                        return_exceptions=True), timeout)
        for endpoint, answer in zip(rotation, answers):
            if isinstance(answer, BaseException):
                raise self._unavailable(RuntimeError(f"{endpoint.url}: {answer}")) from None
        return sum(answers), source

    async def video_embeddings(self, video: bytes, frames: int, timeout: float) -> np.ndarray:
        """What the decoder reads for a video (its frames' mean ImageEmbeddings); caption or stream it."""
        async def run(client):  # decoding gives up by itself at the deadline: a thread cannot be cancelled
            return await client.video_embeddings(video, frames, min(timeout, media.DEFAULT_MAX_DECODE_SECONDS))

        return await self._call(run, timeout)

    async def caption_steps(self, image: Union[bytes, np.ndarray], params: SamplingParams,
                            timeout: float) -> AsyncIterator[Generation]:
        """The caption of image bytes (or ImageEmbeddings) as it grows: serving.client.Generation after each
        decoder step, with the text so far; the last one `done`. All within `timeout` seconds.

        One endpoint serves the stream; if it fails midway, the caption starts again from START on another
        where that gives the same caption (serving.pool.TritonPool.caption_steps): what was already handed
        out is not handed out again. Closing the iterator early (a cancelled call) ends the decoder
        sequence on Triton."""
        from serving.errors import TritonUnavailableError

        deadline = time.monotonic() + timeout

        async def in_time(client):  # each step within the time left (a cancelled step ends the sequence)
            async with contextlib.aclosing(client.caption_steps(image, params)) as steps:
                while True:
                    try:
                        step = await asyncio.wait_for(anext(steps), max(deadline - time.monotonic(), 0.001))
                    except StopAsyncIteration:
                        return
                    yield step

        try:
            async with contextlib.aclosing(self.pool.caption_steps(in_time, params)) as steps:
                async for step in steps:
                    yield step
        except TritonUnavailableError as exc:
            raise self._unavailable(exc) from None

    async def _each(self, fn, items: Sequence, timeout: float) -> list:
        """`fn(client, item)` for each item, each its own pool call (so spread over the endpoints); one
        result or exception per item, ModelsUnavailable included."""
        async def one(item):
            return await self._pooled(lambda client: fn(client, item))

        return list(await asyncio.wait_for(asyncio.gather(*(one(item) for item in items), return_exceptions=True),
                                           timeout))
