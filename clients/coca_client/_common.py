"""What the sync and the asyncio client share: connection settings, retry policy, deadlines."""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import grpc

from search_service.pb.search_pb2_grpc import SearchServiceStub

from . import types as t
from .errors import Unavailable, from_rpc_error

MAX_MESSAGE_BYTES = 64 << 20  # the server's default limit
TOKEN_ENV = "COCA_SEARCH_TOKEN"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})  # and a shed call (below): other codes will not change


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, for UNAVAILABLE and for a call the service shed (RESOURCE_EXHAUSTED
    with its retry hint, trailing metadata retry-after-ms).

    Attempt n (from 1) that fails waits uniform(0.5, 1.0) × min(max_backoff, initial_backoff × multiplier^(n-1))
    before the next one, and after a shed call at least the server's hint × uniform(1, 1 + jitter) (spread, so
    the shed callers do not all come back at once); at most `attempts` tries in all, and never past the
    call's deadline.
    """

    attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5  # the fraction of each backoff that is random

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be in [0, 1]")

    def backoffs(self, rng: random.Random = random._inst) -> Iterator[float]:
        """The waits between attempts (attempts - 1 of them)."""
        base = self.initial_backoff
        for _ in range(self.attempts - 1):
            capped = min(self.max_backoff, base)
            yield capped * (1 - self.jitter * rng.random())
            base *= self.multiplier


NO_RETRY = RetryPolicy(attempts=1)


def retry_wait(error, waits: Iterator[float], policy: RetryPolicy, rng: random.Random = random._inst) -> Optional[float]:
    """Seconds to wait before trying again after `error` (a SearchError), or None: do not retry it."""
    shed = error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None
    if not (shed or error.code in RETRYABLE):
        return None
    wait = next(waits, None)
    if wait is None or not shed:
        return wait
    return max(wait, error.retry_after * (1 + policy.jitter * rng.random()))


class Deadline:
    """One deadline for a whole call, retries included. None: no deadline."""

    def __init__(self, timeout: Optional[float]):
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> Optional[float]:
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def allows(self, wait: float) -> bool:
        """Is there time to wait `wait` seconds and still make a useful attempt?"""
        return self.end is None or time.monotonic() + wait < self.end - 0.01


@dataclass
class Connection:
    """Where and how to connect: target, TLS, token, channel options."""

    target: str
    token: Optional[str] = None
    tls: bool = False
    root_certificates: Optional[bytes] = None
    server_name: Optional[str] = None  # TLS name to check when it differs from the target's host

    @classmethod
    def make(cls, target: str, token: Optional[str], tls_ca: Union[None, str, os.PathLike, bytes],
             tls: Optional[bool], server_name: Optional[str]) -> "Connection":
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        roots = None
        if tls_ca is not None:
            roots = tls_ca if isinstance(tls_ca, bytes) else Path(tls_ca).read_bytes()
        return cls(target, token, bool(tls) or roots is not None, roots, server_name)

    def options(self) -> list[tuple[str, object]]:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.enable_retries", 0)]  # ours, below, are the only retries: one policy to reason about
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> Optional[grpc.ChannelCredentials]:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def open_channel(self, grpc_module):
        """A channel from `grpc` or `grpc.aio` (same call shapes), secure when TLS is on."""
        credentials, options = self.credentials(), self.options()
        if credentials:
            return grpc_module.secure_channel(self.target, credentials, options=options)
        return grpc_module.insecure_channel(self.target, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


DEFAULT_TIMEOUT = 120.0
UNSET = object()  # a call's timeout left out: the client's default


class UnaryAttempts:
    """One unary call's attempts inside one deadline, shared by the sync and asyncio clients:
    each attempt's timeout, and after a failure how long to wait before the next (or the error to raise)."""

    def __init__(self, method: str, target: str, retry: RetryPolicy, timeout: Optional[float]):
        self.method, self.target = method, target
        self.deadline = Deadline(timeout)
        self.policy = retry
        self._waits = retry.backoffs()
        self.attempt = 0

    def timeout(self) -> Optional[float]:
        """The next attempt's timeout (what is left of the deadline)."""
        self.attempt += 1
        return self.deadline.remaining()

    def wait_after(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt; raises the typed error when there is none."""
        error = from_rpc_error(exc, self.method, self.target, self.attempt)
        wait = retry_wait(error, self._waits, self.policy)
        if wait is None or not self.deadline.allows(wait):
            raise error from None
        return wait


class ClientBase:
    """What Client and AsyncClient set up alike: the connection, its channel and stub, call defaults.
    `grpc_module` is grpc (blocking channel) or grpc.aio."""

    grpc_module = grpc

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 retry: RetryPolicy = RetryPolicy(), token: Optional[str] = None,
                 tls_ca: Union[None, str, os.PathLike, bytes] = None, tls: Optional[bool] = None,
                 server_name: Optional[str] = None):
        self.connection = Connection.make(target, token, tls_ca, tls, server_name)
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self.channel = self.connection.open_channel(self.grpc_module)
        self._stub = SearchServiceStub(self.channel)
        self._metadata = self.connection.metadata()

    def _attempts(self, method: str, timeout=UNSET) -> UnaryAttempts:
        return UnaryAttempts(method, self.target, self.retry, self.timeout if timeout is UNSET else timeout)


class HealthWait:
    """wait_ready's loop, shared by the sync and asyncio clients: ask Health.Check until it says SERVING;
    after any other answer, pause and ask again until `timeout` seconds have passed, then Unavailable."""

    PAUSE_S = 0.25

    def __init__(self, client: "ClientBase", service: str, timeout: float):
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.health = health_pb2
        self.check = health_pb2_grpc.HealthStub(client.channel).Check
        self.request = health_pb2.HealthCheckRequest(service=service)
        self.target, self.timeout = client.target, timeout
        self.end = time.monotonic() + timeout
        self.last = "no answer"

    def check_timeout(self) -> float:
        return max(0.1, min(5.0, self.end - time.monotonic()))

    def serving(self, reply) -> bool:
        if reply.status == self.health.HealthCheckResponse.SERVING:
            return True
        self.last = f"health is {self.health.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return False

    def pause_after(self, exc: Optional[grpc.RpcError] = None) -> float:
        """Seconds to pause before asking again; Unavailable once the time is up."""
        if exc is not None:
            self.last = f"{exc.code().name}: {exc.details()}"
        if time.monotonic() >= self.end:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, f"not SERVING after {self.timeout:.0f} s ({self.last})",
                              "Health.Check", self.target)
        return self.PAUSE_S


class AddStream:
    """One `add` call's resume state, shared by the sync and asyncio clients: which items the next
    AddImages stream sends, the results' indices in the caller's items, and whether a failure is
    retried. Only a sequence can be replayed; a stream resumes after the last acknowledged item."""

    def __init__(self, items, retry: RetryPolicy, timeout: Optional[float]):
        self.items = items
        self.replayable = isinstance(items, Sequence)
        self.deadline = Deadline(timeout)
        self.attempt = 0
        self.policy = retry
        self._waits = retry.backoffs() if self.replayable else NO_RETRY.backoffs()
        self._start = 0  # first item not yet acknowledged
        self._base = 0  # the current stream's item 0 is items[_base]

    def requests(self) -> Iterator:
        """The next stream's requests: the items not yet acknowledged (all, the first time)."""
        self.attempt += 1
        self._base = self._start
        source = self.items[self._start:] if self.replayable else self.items
        return (t.as_add_item(item).to_pb() for item in source)

    def result(self, response):
        """The AddResult of one response, indexed in the caller's items."""
        result = t.AddResult.from_pb(response, offset=self._base)
        if self.replayable:
            self._start = result.index + 1
        return result

    def wait_before_retry(self, error) -> Optional[float]:
        """Seconds to wait before resuming after `error`, or None: raise it."""
        wait = retry_wait(error, self._waits, self.policy)
        if wait is None or not self.deadline.allows(wait) or (self.replayable and self._start >= len(self.items)):
            return None
        return wait
