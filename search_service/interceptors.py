"""Server interceptors for operators: per-call metrics and load shedding (server.py has auth and parsing).

Both wrap the handler of each SearchService call with an async context that runs around the call,
whatever its kind (unary or streaming), and leave health checks and reflection alone.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from typing import AsyncContextManager, Callable, Optional

import grpc

from .admission import Admission, Shed, request_class
from .metrics import ServiceMetrics
from .pb import search_pb2

SERVICE_PREFIX = "/" + search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name + "/"

HANDLER_KINDS = {  # (request streaming, response streaming) -> (behaviour attribute, handler factory)
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def with_behaviour(handler: grpc.RpcMethodHandler, make: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers whose behaviour is `make(old behaviour, kind)`."""
    kind = (handler.request_streaming, handler.response_streaming)
    attribute, factory = HANDLER_KINDS[kind]
    return factory(make(getattr(handler, attribute), kind), request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def around_calls(handler: grpc.RpcMethodHandler,
                 around: Callable[[grpc.aio.ServicerContext], AsyncContextManager]) -> grpc.RpcMethodHandler:
    """`handler` with every call run inside `around(context)` (a streamed response: until its last message)."""

    def make(behaviour, kind):
        if kind[1] and inspect.isasyncgenfunction(behaviour):  # response streaming: an async generator
            async def streamed(request, context):
                async with around(context):
                    async for response in behaviour(request, context):
                        yield response
            return streamed

        # unary, or a streaming handler that writes with context.write (grpc.aio awaits those as coroutines,
        # and so do refusals such as the bearer token's, which answer before any message)

        async def unary(request, context):
            async with around(context):
                return await behaviour(request, context)
        return unary

    return with_behaviour(handler, make)


def service_method(details: grpc.HandlerCallDetails) -> Optional[str]:
    """"SearchText" for /coca.search.v1.SearchService/SearchText; None for other services (health, reflection)."""
    method = details.method or ""
    return method[len(SERVICE_PREFIX):] if method.startswith(SERVICE_PREFIX) else None


class RecordMetrics(grpc.aio.ServerInterceptor):
    """Time every SearchService call and record it by RPC and final status code. Outermost, so refusals
    by the other interceptors (UNAUTHENTICATED, RESOURCE_EXHAUSTED, unparseable requests) count too."""

    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = service_method(details)
        if handler is None or method is None:
            return handler

        @contextlib.asynccontextmanager
        async def timed(context):
            started, code = time.perf_counter(), "OK"
            try:
                yield
            except BaseException as exc:  # AbortError: the code context.abort set; a call its client cancelled
                code = _code_name(context.code()) or (
                    "CANCELLED" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else "UNKNOWN")
                raise
            finally:
                self.metrics.record_request(method, code, time.perf_counter() - started)

        return around_calls(handler, timed)


class ShedLoad(grpc.aio.ServerInterceptor):
    """Hold a slot of its class (search, ingest, caption) for each SearchService call, waiting a while for
    one past the bound (admission.py); refuse with RESOURCE_EXHAUSTED and a retry hint (trailing metadata
    retry-after-ms) when its caller is over the rate limit or no slot frees in time."""

    def __init__(self, admission: Admission, by_token: bool):
        self.admission = admission
        self.by_token = by_token  # rate buckets per bearer token (checked by the auth before), else per address

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = service_method(details)
        if handler is None or method is None:
            return handler
        kind = request_class(method)
        token = dict(details.invocation_metadata or ()).get("authorization") if self.by_token else None

        @contextlib.asynccontextmanager
        async def admitted(context):
            async with contextlib.AsyncExitStack() as slot:
                try:
                    self.admission.check_rate(token or _client_host(context))
                    if kind is not None:  # (UNCOUNTED_METHODS: bounded by their own rule)
                        await slot.enter_async_context(self.admission.admitted(kind, context.time_remaining()))
                except Shed as exc:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                                        trailing_metadata=exc.trailing_metadata())
                yield

        return around_calls(handler, admitted)


def _client_host(context) -> str:
    """The caller's address without its port ("ipv4:127.0.0.1:53211" -> "ipv4:127.0.0.1")."""
    return (context.peer() or "").rpartition(":")[0]


def _code_name(code) -> Optional[str]:
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))
