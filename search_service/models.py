"""The service's view of Triton: per-item outcomes, time limits, and a fresh channel after an outage.

All model work goes through serving.client.TritonCoca (tritonclient.grpc.aio).
Images are embedded and captioned one Triton request per image, concurrently:
Triton's dynamic batcher (encoders) and sequence batcher (decoder) batch them,
and a bad image fails its own request only.

After a connection failure the next call gets a new client (the failed one is
closed once the calls still on it end), so the service recovers as soon as
Triton is back.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
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
    repository_id: str = field(default="", compare=False)  # the export's weights hash (precomputed embeddings)


class _Connection:
    """One Triton client and the number of calls using it. A connection that failed is retired: new
    calls get a fresh one, and the old one is closed when its last call ends. (Closing a gRPC channel
    cancels the calls still on it, which would leave their callers without an answer.)"""

    def __init__(self, url: str):
        from serving.client import TritonCoca

        self.client = TritonCoca(url)
        self.users = 0
        self.retired = False

    async def close_if_done(self) -> None:
        if self.retired and self.users == 0:
            try:
                await self.client.close()
            except Exception:  # closing a dead channel may fail too
                pass


class Models:
    """Embeddings and captions from the Triton server at `url`."""

    def __init__(self, url: str, logit_scale: float = 100.0):
        self.url = url
        self.logit_scale = logit_scale  # Classify's softmax scale (CoCa's learned one is not served)
        self._connection: Optional[_Connection] = None
        self._identity: Optional[ModelIdentity] = None

    # ------------------------------------------------------------ connection
    @contextlib.asynccontextmanager
    async def _lease(self):
        """The current connection (made now if there is none), held for one call."""
        if self._connection is None:
            self._connection = _Connection(self.url)
        connection = self._connection
        connection.users += 1
        try:
            yield connection
        finally:
            connection.users -= 1
            await connection.close_if_done()

    def _retire(self, connection: _Connection) -> None:
        if self._connection is connection:
            self._connection = None
        connection.retired = True

    def _unavailable(self, exc: BaseException) -> ModelsUnavailable:
        return ModelsUnavailable(f"model server (Triton) at {self.url} is unavailable: {exc}")

    async def _call(self, fn: Callable[..., Awaitable[T]], timeout: float) -> T:
        """Run `fn(client)` within `timeout` seconds; connection failures become ModelsUnavailable."""
        from serving.errors import TritonUnavailableError

        async with self._lease() as connection:
            try:
                return await asyncio.wait_for(fn(connection.client), timeout)
            except TritonUnavailableError as exc:
                self._retire(connection)
                raise self._unavailable(exc) from None

    async def close(self) -> None:
        if self._connection is not None:
            connection = self._connection
            self._retire(connection)
            await connection.close_if_done()

    async def ready(self) -> bool:
        try:
            await self.identity(timeout=5.0, refresh=True)
            return True
        except (ModelsUnavailable, asyncio.TimeoutError):
            return False

    @property
    def known_identity(self) -> Optional[ModelIdentity]:
        """What Triton said it serves when last asked (None before it first answered)."""
        return self._identity

    async def identity(self, timeout: float = 30.0, refresh: bool = False) -> ModelIdentity:
        """Which model Triton serves (asked once per connection, or now with `refresh`)."""
        if not refresh and self._connection is not None and self._identity is not None:
            return self._identity

        async def ask(client):
            from serving.errors import IdentityMismatchError

            try:
                found = await client.identity()
            except IdentityMismatchError as exc:
                raise ModelMismatch(str(exc)) from None
            return ModelIdentity(found.model, found.pretrained, int(found.embed_dim), found.repository_id)

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
        if not items:
            return []
        from serving.errors import TritonUnavailableError

        async def run(client):
            return await asyncio.gather(*(fn(client, item) for item in items), return_exceptions=True)

        async with self._lease() as connection:
            results = await asyncio.wait_for(run(connection.client), timeout)
            failures = [r for r in results if isinstance(r, TritonUnavailableError)]
            if failures:
                self._retire(connection)
                down = self._unavailable(failures[0])
                results = [down if isinstance(r, TritonUnavailableError) else r for r in results]
        return results

