"""The service's view of Triton: per-item outcomes, time limits, and a fresh channel after an outage.

All model work goes through serving.client.TritonCoca (tritonclient.grpc.aio).
Images are embedded and captioned one Triton request per image, concurrently:
Triton's dynamic batcher (encoders) and sequence batcher (decoder) batch them,
and a bad image fails its own request only.

After a connection failure the client is closed and a new one made on the next
call, so the service recovers as soon as Triton is back rather than waiting
out gRPC's reconnect backoff (up to two minutes).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, Sequence, TypeVar

import numpy as np

from coca.sampling import SamplingParams

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


@dataclass
class CaptionResult:
    text: str
    tokens: list[int]
    logprobs: list[float]  # empty: serving.client does not return them (yet)


class Models:
    """Embeddings and captions from the Triton server at `url`."""

    def __init__(self, url: str, logit_scale: float = 100.0):
        self.url = url
        self.logit_scale = logit_scale  # Classify's softmax scale (CoCa's learned one is not served)
        self._client = None
        self._identity: Optional[ModelIdentity] = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ connection
    async def _connect(self):
        from serving.client import TritonCoca

        async with self._lock:
            if self._client is None:
                self._client = TritonCoca(self.url)
            return self._client

    async def _drop(self, client) -> None:
        async with self._lock:
            if self._client is client:
                self._client = None
        try:
            await client.close()
        except Exception:  # closing a dead channel may fail too
            pass

    async def _call(self, fn: Callable[..., Awaitable[T]], timeout: float) -> T:
        """Run `fn(client)` within `timeout` seconds; connection failures become ModelsUnavailable."""
        from serving.errors import TritonUnavailableError

        client = await self._connect()
        try:
            return await asyncio.wait_for(fn(client), timeout)
        except TritonUnavailableError as exc:
            await self._drop(client)
            raise ModelsUnavailable(f"model server (Triton) at {self.url} is unavailable: {exc}") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._drop(self._client)

    async def ready(self) -> bool:
        try:
            await self.identity(timeout=5.0, refresh=True)
            return True
        except (ModelsUnavailable, asyncio.TimeoutError):
            return False

    async def identity(self, timeout: float = 30.0, refresh: bool = False) -> ModelIdentity:
        """Which model Triton serves (asked once per connection, or now with `refresh`)."""
        if not refresh and self._client is not None and self._identity is not None:
            return self._identity

        async def ask(client):
            from serving.errors import IdentityMismatchError

            try:
                found = await client.identity()
            except IdentityMismatchError as exc:
                raise ModelMismatch(str(exc)) from None
            return ModelIdentity(found.model, found.pretrained, int(found.embed_dim))

        identity = await self._call(ask, timeout)
        if self._identity is not None and identity != self._identity:
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
        async def run(client):
            return await client.embed_texts(list(texts))

        return np.asarray(await self._call(run, timeout), np.float32)

    # ------------------------------------------------------------ captions
    async def caption(self, image: bytes, params: SamplingParams, timeout: float) -> CaptionResult:
        async def run(client):
            return _caption(*await client.caption(image, params))

        return await self._call(run, timeout)

    async def caption_video(self, video: bytes, frames: int, params: SamplingParams, timeout: float) -> CaptionResult:
        async def run(client):
            return _caption(*await client.caption_video(video, frames=frames, params=params))

        return await self._call(run, timeout)

    async def caption_each(self, images: Sequence[bytes], params: SamplingParams, timeout: float) -> list:
        """Captions of several images at once, one decoder sequence each; one result or exception per image."""
        async def one(client, data):
            return _caption(*await client.caption(data, params))

        return await self._each(one, images, timeout)

    async def _each(self, fn, items: Sequence, timeout: float) -> list:
        if not items:
            return []

        async def run(client):
            return await asyncio.gather(*(fn(client, item) for item in items), return_exceptions=True)

        from serving.errors import TritonUnavailableError

        client = await self._connect()
        results = await self._call(run, timeout)
        failures = [r for r in results if isinstance(r, TritonUnavailableError)]
        if failures:
            await self._drop(client)
            down = ModelsUnavailable(f"model server (Triton) at {self.url} is unavailable: {failures[0]}")
            results = [down if isinstance(r, TritonUnavailableError) else r for r in results]
        return results


def _caption(text: str, tokens: list[int]) -> CaptionResult:
    return CaptionResult(text=text, tokens=[int(t) for t in tokens], logprobs=[])
