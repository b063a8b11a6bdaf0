"""Several Triton servers that serve the same CoCa export, used as one.

    async with TritonPool(["10.0.0.1:8001", "10.0.0.2:8001"]) as pool:
        await pool.identity()                                  # every endpoint serves the same export
        vectors = await pool.call(lambda t: t.embed_images([jpeg]))
        caption = await pool.call(lambda t: t.caption(jpeg, SamplingParams()))
        async for step in pool.caption_steps(lambda t: t.caption_steps(jpeg, params), params): ...

Routing: each call goes to the healthy endpoint with the fewest calls in flight (ties in turn).
A call runs on one endpoint from start to end, so a caption's decoder sequence, and the KV cache
that server keeps for it, stays where its START went.

Failures: an endpoint whose server cannot be reached, or does not answer in time, is taken out of
rotation at once, and a probe asks it what it serves (within `probe_timeout_s`, every
`probe_interval_s`) until it answers with the pool's model; then it is back. "In time": an identity
question within `probe_timeout_s`; a model request within its latency deadline, a multiple of that
model's recent p99 per row on that endpoint times the request's rows (serving.client.DEADLINE_*), which applies while another healthy
endpoint is left to run the call (the last one left waits as long as the caller does). A hung server
(stopped processes, a network that holds the bytes) so costs the calls on it one deadline each, and
the others nothing. One outage is one trip out and back: only news about the connection
in use counts (each retired connection is a generation), so the other calls cut by the same failure,
and an answer asked before a failure that arrives after it, change nothing. The call the failure cut
runs again, once, on another endpoint: encoders are pure functions and greedy or seeded captions
are reproducible (a caption starts again from START there), so the answer is the one an
uninterrupted call gives; a streamed caption (caption_steps) hands out only the steps after those it
had handed out. A full decoder cache is
tried once elsewhere too. When no endpoint is healthy, calls still try them (a call is its own
probe) and fail with TritonUnavailableError naming every endpoint. Endpoints that answer with
different models make identity() fail with IdentityMismatchError naming both; an endpoint that
comes back with another model stays out.

Every wait is bounded: an identity question that times out is cancelled and left to end by itself
(asyncio.wait_for would wait for it, and in Python 3.11 it can swallow the cancel of the task awaiting it
when the question is answered at that moment: a probe cancelled so never ended, and closing the pool
waited for it forever). Closing waits CLOSE_WAIT_S at most for a probe or a channel.

One pool per event loop (like TritonCoca, which it holds one of per endpoint).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Optional, Sequence, TypeVar, Union

from coca.errors import CapacityError
from coca.settings import SamplingParams

from .client import Generation, HandedSteps, InferObserver, LatencyWindow, TritonCoca, latency_deadlines
from .errors import IdentityMismatchError, TritonUnavailableError
from .protocol import Identity

log = logging.getLogger("serving.pool")
T = TypeVar("T")

PROBE_INTERVAL_S = 0.5  # how often an endpoint out of rotation is asked whether it is back
PROBE_TIMEOUT_S = 1.0  # how long an identity question (a probe, identity()) waits before the endpoint is out
CLOSE_WAIT_S = 2.0  # how long closing waits for a probe to end, or for a gRPC channel to close
MAX_ENDPOINTS = 64
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def parse_endpoints(spec: Union[str, Sequence[str]]) -> list[str]:
    """HOST:PORT addresses from "a:8001,b:8001" (or a list); ValueError naming what is wrong."""
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p).strip() for p in spec]
    if not parts or any(not p for p in parts):
        raise ValueError(f"Triton endpoints must be HOST:PORT[,HOST:PORT...], got {spec!r}")
    for part in parts:
        match = _ADDRESS.match(part)
        if match is None or not 1 <= int(match.group(2)) <= 65535:
            raise ValueError(f"Triton endpoint {part!r} is not HOST:PORT (port 1-65535)")
    if len(set(parts)) != len(parts):
        raise ValueError(f"Triton endpoint listed twice in {spec!r}")
    if len(parts) > MAX_ENDPOINTS:
        raise ValueError(f"at most {MAX_ENDPOINTS} Triton endpoints, got {len(parts)}")
    return parts


@dataclass(frozen=True)
class EndpointState:
    """One endpoint as stats show it."""

    url: str
    healthy: bool  # in rotation
    in_flight: int  # calls running on it now
    calls: int  # calls finished on it (answered or failed)
    outages: int  # times it was taken out of rotation
    last_error: str  # why it was last taken out, or why a probe still keeps it out
    down_s: float  # seconds out of rotation so far (0 while healthy)


class _Connection:
    """One TritonCoca and the number of calls using it. A connection that failed is retired: new
    calls get a fresh one, and the old one is closed when its last call ends. (Closing a gRPC channel
    cancels the calls still on it, which would leave their callers without an answer.)"""

    def __init__(self, url: str, observe: Optional[InferObserver] = None, scheduler: str = "auto",
                 latency: Optional[LatencyWindow] = None):
        self.client = TritonCoca(url, observe=observe, scheduler=scheduler, latency=latency)
        self.users = 0
        self.retired = False

    async def close_if_done(self) -> None:
        if self.retired and self.users == 0:
            closing = asyncio.ensure_future(self.client.close())
            if await within(closing, CLOSE_WAIT_S) and not closing.cancelled():
                closing.exception()  # closing a dead channel may fail too: nothing more to do


class Endpoint:
    """One Triton server of the pool: its connection, load and health."""

    def __init__(self, url: str, observe: Optional[InferObserver] = None, scheduler: str = "auto"):
        self.url = url
        self.observe = observe  # told of each infer call (the service's metrics)
        self.scheduler = scheduler  # how its client captions (serving.client.TritonCoca)
        self.healthy = True  # until a call cannot reach it (identity() checks it first)
        self.in_flight = 0
        self.calls = 0
        self.outages = 0
        self.last_error = ""
        self.down_since: Optional[float] = None
        self.probe: Optional[asyncio.Task] = None
        self.generation = 0  # which connection: one more each time one is retired after a failure
        self.latency = LatencyWindow()  # its answered requests, across connections: the latency deadlines
        self.served: Optional[Identity] = None  # what it last said it serves
        self.closed = False  # the pool closed: its probe ends
        self._connection: Optional[_Connection] = None

    async def run(self, fn: Callable[[TritonCoca], Awaitable[T]], counted: bool = True) -> T:
        """`await fn(client)` on this endpoint's connection (a fresh one after a failure); `counted`
        calls are load (in flight, calls), probes are not. A failure to reach the server takes the
        endpoint out of rotation (see take_out)."""
        async with self.connected(counted) as client:
            return await fn(client)

    @contextlib.asynccontextmanager
    async def connected(self, counted: bool = True) -> AsyncIterator[TritonCoca]:
        """This endpoint's client for the block (a call, or a stream's life); see run."""
        if self._connection is None:
            self._connection = _Connection(self.url, self.observe, self.scheduler, self.latency)
        connection, generation = self._connection, self.generation
        connection.users += 1
        self.in_flight += counted
        try:
            yield connection.client
        except TritonUnavailableError as exc:
            self.take_out(generation, exc)
            raise
        finally:
            self.in_flight -= counted
            self.calls += counted
            connection.users -= 1
            await connection.close_if_done()

    async def ask_identity(self, timeout: float) -> Identity:
        """What the server serves, within `timeout`; a server that does not answer in time is out of
        rotation as one that cannot be reached (TritonUnavailableError), and gets a fresh connection
        next time. Read `generation` before asking: bring_back wants it."""
        generation = self.generation
        question = asyncio.ensure_future(self.run(lambda client: client.identity(), counted=False))
        if not await within(question, timeout):  # cancelled, and left to end: it closes its retired connection
            exc = TritonUnavailableError(f"Triton at {self.url} did not answer an identity question within {timeout:g} s")
            self.take_out(generation, exc)
            raise exc
        self.served = question.result()
        return self.served

    def take_out(self, generation: int, exc: BaseException) -> None:
        """A call on connection `generation` could not reach the server: out of rotation (one outage),
        the connection retired. Only news counts: the other calls cut by the same failure fail on a
        connection already retired, and change nothing."""
        if not self._retire(generation):
            return
        self.last_error = str(exc) or type(exc).__name__
        if self.healthy:
            self.healthy = False
            self.outages += 1
            self.down_since = time.monotonic()
            log.warning("Triton endpoint %s out of rotation: %s", self.url, self.last_error)

    def bring_back(self, generation: int) -> bool:
        """An answer asked on connection `generation` says the server serves the pool's model: back in
        rotation, unless that connection has failed since (the answer predates a take-out: stale)."""
        if generation != self.generation:
            return False
        if not self.healthy:
            log.warning("Triton endpoint %s back in rotation after %.1f s", self.url,
                        time.monotonic() - (self.down_since or time.monotonic()))
        self.healthy, self.down_since, self.last_error = True, None, ""
        return True

    def _retire(self, generation: int) -> bool:
        """Retire the connection of `generation` if it is still the one in use (True then)."""
        if generation != self.generation:
            return False
        self.generation += 1
        if self._connection is not None:
            self._connection.retired = True
            self._connection = None
        return True

    async def close(self) -> None:
        self.closed = True
        if self.probe is not None:
            self.probe.cancel()
        if self.probe is not None and not await within(self.probe, CLOSE_WAIT_S):
            log.warning("the probe of Triton endpoint %s did not end within %g s of its cancel", self.url, CLOSE_WAIT_S)
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.retired = True
            await connection.close_if_done()

    def state(self) -> EndpointState:
        down = 0.0 if self.down_since is None else time.monotonic() - self.down_since
        return EndpointState(self.url, self.healthy, self.in_flight, self.calls, self.outages, self.last_error,
                             round(down, 3))


class TritonPool:
    """Calls spread over Triton endpoints that serve the same model; see the module docstring."""

    def __init__(self, endpoints: Union[str, Sequence[str]], probe_interval_s: float = PROBE_INTERVAL_S,
                 probe_timeout_s: float = PROBE_TIMEOUT_S, observe: Optional[InferObserver] = None,
                 scheduler: str = "auto"):
        self.endpoints = [Endpoint(url, observe, scheduler) for url in parse_endpoints(endpoints)]
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.failovers = 0  # calls run again on another endpoint
        self._identity: Optional[Identity] = None  # what the endpoints last agreed they serve
        self._turn = 0

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]

    def __str__(self) -> str:
        return ", ".join(self.urls)

    async def __aenter__(self) -> "TritonPool":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.endpoints))

    def states(self) -> list[EndpointState]:
        return [e.state() for e in self.endpoints]

    @property
    def healthy(self) -> bool:
        return any(e.healthy for e in self.endpoints)

    # ------------------------------------------------------------ calls
    async def call(self, fn: Callable[[TritonCoca], Awaitable[T]]) -> T:
        """`await fn(client)` on the least-loaded healthy endpoint; run again once on another endpoint
        if that server cannot be reached or does not answer within its latency deadline (it then leaves
        rotation), or its decoder cache is full."""
        failed: list[tuple[Endpoint, Exception]] = []
        while True:
            tried = [e for e, _ in failed]
            endpoint = self._pick(exclude=tried)
            bounded = latency_deadlines.set(self._has_fallback(endpoint, tried))
            try:
                return await endpoint.run(fn)
            except (TritonUnavailableError, CapacityError) as exc:
                self._failed(endpoint, exc, failed, again=True)
            finally:
                latency_deadlines.reset(bounded)

    async def caption_steps(self, fn: Callable[[TritonCoca], AsyncIterator[Generation]],
                            params: SamplingParams) -> AsyncIterator[Generation]:
        """The steps of a caption that `fn(client)` hands out as it grows (a streamed caption), from the
        least-loaded healthy endpoint. Started again from START once on another endpoint, as `call` runs a
        call again, where that gives the same caption: before its first step was handed out, or when
        `params` are reproducible (greedy, seeded); then the steps already handed out are not handed out
        again (serving.client.HandedSteps). A sampled caption without a seed cut midway fails."""
        failed: list[tuple[Endpoint, Exception]] = []
        handed = HandedSteps()
        # set back, not reset: a stream may be closed from another context than the one it began in
        previous = latency_deadlines.get()
        try:
            while True:
                tried = [e for e, _ in failed]
                endpoint = self._pick(exclude=tried)
                latency_deadlines.set(self._has_fallback(endpoint, tried))
                handed.new_run()
                try:
                    async with endpoint.connected() as client, contextlib.aclosing(fn(client)) as steps:
                        async for generation in steps:
                            if handed.is_new(generation):
                                yield generation
                    return
                except (TritonUnavailableError, CapacityError) as exc:
                    self._failed(endpoint, exc, failed, again=handed.can_restart(params))
        finally:
            latency_deadlines.set(previous)

    def _failed(self, endpoint: Endpoint, exc: Exception, failed: list[tuple[Endpoint, Exception]],
                again: bool) -> None:
        """A call (or stream) on `endpoint` failed with `exc`: the endpoint is watched when it left rotation;
        returns when the call may run again on another endpoint (`again`, and one not tried is left), else
        raises the call's error."""
        if isinstance(exc, TritonUnavailableError):
            self._watch(endpoint)
        failed.append((endpoint, exc))
        if not again or len(failed) > 1 or len(failed) == len(self.endpoints):
            raise self._failure(failed) from None
        self.failovers += 1
        log.info("%s failed (%s): running the call again on another endpoint", endpoint.url, exc)

    def _pick(self, exclude: Sequence[Endpoint]) -> Endpoint:
        """The healthy endpoint with the fewest calls in flight, ties in turn; when none is healthy,
        any not yet tried (the call finds out whether it is back)."""
        left = [e for e in self.endpoints if e not in exclude]
        candidates = [e for e in left if e.healthy] or left
        turn, self._turn = self._turn, self._turn + 1
        order = {id(e): (i - turn) % len(self.endpoints) for i, e in enumerate(self.endpoints)}
        return min(candidates, key=lambda e: (e.in_flight, order[id(e)]))

    def _has_fallback(self, endpoint: Endpoint, tried: Sequence[Endpoint]) -> bool:
        """Whether another healthy endpoint could run the call if `endpoint` does not answer in time:
        only then is a request held to its latency deadline."""
        return any(e.healthy and e is not endpoint and e not in tried for e in self.endpoints)

    @staticmethod
    def _failure(failed: list[tuple[Endpoint, Exception]]) -> Exception:
        """The error of a call no endpoint could serve: the last one's own when it is a full cache or the
        only endpoint, else one naming each endpoint tried and its error."""
        last = failed[-1][1]
        if len(failed) == 1 or isinstance(last, CapacityError):
            return last
        return TritonUnavailableError("no Triton endpoint could serve the call: "
                                      + "; ".join(f"{e.url}: {exc}" for e, exc in failed))

    # ------------------------------------------------------------ health
    def _watch(self, endpoint: Endpoint) -> None:
        """Probe an endpoint out of rotation until it is back (one probe at a time)."""
        if not endpoint.healthy and (endpoint.probe is None or endpoint.probe.done()):
            endpoint.probe = asyncio.get_running_loop().create_task(self._probe(endpoint))

    async def _probe(self, endpoint: Endpoint) -> None:
        """Ask an endpoint out of rotation what it serves until it answers with the pool's model."""
        while not endpoint.healthy and not endpoint.closed:
            await asyncio.sleep(self.probe_interval_s)
            generation = endpoint.generation
            try:
                found = await endpoint.ask_identity(self.probe_timeout_s)
            except Exception as exc:  # unreachable, no answer in time, or its models disagree among themselves
                endpoint.last_error = str(exc) or type(exc).__name__
                continue
            if self._identity is not None and found != self._identity:
                endpoint.last_error = f"serves {_shown(found)}, the other endpoints {_shown(self._identity)}"
                continue
            endpoint.bring_back(generation)  # a call that failed meanwhile made this answer stale

    async def identity(self, timeout: float = 30.0) -> Identity:
        """The model and weights the endpoints serve, asked now of those in rotation (of every endpoint
        when none is); an endpoint out of rotation counts with what its probe last heard from it.

        Each endpoint asked has `probe_timeout_s` to answer; one that does not, or cannot be reached,
        leaves rotation (a probe asks it back). Only when none has answered by then is the first answer
        awaited, up to `timeout`. IdentityMismatchError names two endpoints that serve different models;
        TritonUnavailableError names every endpoint asked when none answers.
        """
        asked = [e for e in self.endpoints if e.healthy] or list(self.endpoints)
        generations = {e.url: e.generation for e in asked}
        answers = await self._ask(asked, min(self.probe_timeout_s, timeout))
        if not any(isinstance(a, Identity) for a in answers) and timeout > self.probe_timeout_s:
            generations = {e.url: e.generation for e in asked}  # the first question's timeouts retired some
            answers = await self._ask(asked, timeout - self.probe_timeout_s)  # a lone slow server beats none
        found: dict[str, Identity] = {}
        for endpoint, answer in zip(asked, answers):
            if isinstance(answer, Identity):
                found[endpoint.url] = answer
            elif isinstance(answer, TritonUnavailableError):
                self._watch(endpoint)  # out of rotation since it did not answer
            elif isinstance(answer, BaseException):
                raise answer  # e.g. its three models come from different exports
        if not found:
            if len(asked) == 1:
                raise answers[0]
            raise TritonUnavailableError("no Triton endpoint answered: " + "; ".join(
                f"{e.url}: {a}" for e, a in zip(asked, answers)))
        known = dict(found)  # and what the endpoints out of rotation said last
        known.update({e.url: e.served for e in self.endpoints if e not in asked and e.served is not None})
        identities = list(dict.fromkeys(known.values()))
        if len(identities) > 1:
            first, other = ([url for url, i in known.items() if i == identity][0] for identity in identities[:2])
            raise IdentityMismatchError(
                f"the Triton endpoints serve different models: {first} serves {_shown(known[first])}, "
                f"{other} serves {_shown(known[other])}; every endpoint must serve the same export")
        self._identity = identities[0]
        for endpoint in asked:
            if endpoint.url in found:
                endpoint.bring_back(generations[endpoint.url])  # unless a call failed on it after it answered
        return self._identity

    @staticmethod
    async def _ask(endpoints: Sequence[Endpoint], timeout: float) -> list:
        """Each endpoint's identity or exception, each within `timeout` (see Endpoint.ask_identity)."""
        return await asyncio.gather(*(e.ask_identity(timeout) for e in endpoints), return_exceptions=True)


_left: set[asyncio.Future] = set()  # cancelled awaitables that have not ended yet (held: a task only weakly held is lost)


async def within(awaitable: Awaitable, timeout: float) -> bool:
    """Await `awaitable` for `timeout` seconds at most: True when it ended (its exception, if any, is the
    caller's to read from the future). Else it is cancelled and left to end by itself: False. A cancel of
    the caller cancels it too, and is never swallowed."""
    future = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({future}, timeout=timeout)
    except asyncio.CancelledError:
        _leave(future)
        raise
    if done:
        return True
    _leave(future)
    return False


def _leave(future: asyncio.Future) -> None:
    future.cancel()
    _left.add(future)
    future.add_done_callback(_forget)


def _forget(future: asyncio.Future) -> None:
    _left.discard(future)
    if not future.cancelled():
        future.exception()  # read: an error of a question nobody waits for any more is not "never retrieved"


def _shown(identity: Identity) -> str:
    return f"{identity.model} ({identity.pretrained}, {identity.dtype}, weights {identity.repository_id[:12]})"

