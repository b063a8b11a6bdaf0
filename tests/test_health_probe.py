"""Health Check is unauthenticated: a storm of Checks must not become a storm of store RPCs and Triton
questions. Checks share one refresh in flight and reuse its answer for HEALTH_CHECK_TTL_S."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from search_service.server import HEALTH_CHECK_TTL_S, LiveHealth


class CountingServicer:
    """What LiveHealth asks of the service: each probe counted, each taking `probe_s` (a slow store)."""

    def __init__(self, probe_s: float):
        self.probe_s = probe_s
        self.store_probes = self.triton_probes = 0
        self.models = SimpleNamespace(endpoints=lambda: [], capacity_source=lambda: ())
        self.admission = SimpleNamespace(capacity_outdated=lambda source: False)  # capacity known: no question

    async def models_problem(self, timeout):
        self.triton_probes += 1
        return None

    async def store_problem(self):
        self.store_probes += 1
        await asyncio.sleep(self.probe_s)
        return None


async def checks(servicer, callers: int, rounds: int, pause_s: float) -> list[int]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(LiveHealth(servicer), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            statuses = []
            for _ in range(rounds):
                answers = await asyncio.gather(*(stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                                                 for _ in range(callers)))
                statuses += [a.status for a in answers]
                await asyncio.sleep(pause_s)
            return statuses
    finally:
        await server.stop(0)


def test_concurrent_checks_share_one_store_probe():
    servicer = CountingServicer(probe_s=0.2)
    statuses = asyncio.run(checks(servicer, callers=50, rounds=3, pause_s=0))
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 150
    # 150 Checks within one TTL (3 rounds of a 0.2 s probe < 1 s + one more round at most): 1 or 2 probes,
    # where each Check used to probe the store and Triton itself (150 each).
    assert 1 <= servicer.store_probes <= 2 and servicer.triton_probes == servicer.store_probes


def test_a_check_after_the_ttl_probes_again():
    servicer = CountingServicer(probe_s=0.0)
    started = time.monotonic()
    asyncio.run(checks(servicer, callers=10, rounds=3, pause_s=HEALTH_CHECK_TTL_S + 0.1))
    rounds_apart = 3
    assert servicer.store_probes == rounds_apart, f"{servicer.store_probes} probes in {time.monotonic() - started:.1f} s"
