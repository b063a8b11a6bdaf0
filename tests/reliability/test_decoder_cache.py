"""Decoder cache hygiene against the real Triton decoder (coca-tiny, CAPACITY rows, IDLE_S idle timeout).

Sequences are STARTed (each takes a KV-cache row) and abandoned: never stepped, never ENDed. Triton
drops them after its idle timeout without telling the model, so the model's own TTL must free the
rows. Each round fills the cache to its cap and asks for a few more (a clear "decoder cache full"
error, RESOURCE_EXHAUSTED through the search service), then waits for the TTL: live sequences and
cache bytes in use return to their baseline, the decoder process's RSS does not grow, and a full
caption still works afterwards.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from coca.errors import CapacityError
from coca.sampling import SamplingParams

from .conftest import CAPACITY, EXPIRY_INTERVAL_S, IDLE_S, needs_triton, rss_bytes, short, unique_jpegs

pytestmark = needs_triton
BEYOND = 2  # extra STARTs per round, past the cap


def decoder_pid(server) -> int:
    for pid in server.process_group_members():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"coca_text_decoder" in f.read():
                    return pid
        except OSError:
            continue
    raise AssertionError("no decoder stub process found")


@pytest.mark.parametrize("sequences", [pytest.param(50, id="50-sequences", marks=short),
                                       pytest.param(1000, id="1000-sequences", marks=pytest.mark.long)])
def test_abandoned_sequences_are_freed_and_the_cap_is_a_clear_error(sequences, live_triton, shared_service, figures):
    import grpc

    from search_service.testing import WireClient
    from serving.client import TritonCoca, _start_inputs
    from serving.protocol import STEP_OUTPUTS, TEXT_DECODER

    server = live_triton
    pid = decoder_pid(server)
    image = unique_jpegs(98, 1)[0]

    service = WireClient(shared_service.address, timeout=30)
    assert service.caption(image=image, max_tokens=4).tokens  # warm: the next one is quick, within the TTL

    def caption_through_the_service() -> grpc.RpcError:
        """A Caption call while the cache is full (the service uses the same Triton)."""
        with pytest.raises(grpc.RpcError) as info:
            service.caption(image=image, max_tokens=4)
        return info.value

    async def start(t, sequence_id, embeddings):
        inputs = _start_inputs(embeddings, SamplingParams(max_tokens=8))
        await t._infer(TEXT_DECODER, inputs, STEP_OUTPUTS, sequence_id=sequence_id, sequence_start=True)

    async def wait_until_freed(t, deadline_s):
        started = time.monotonic()
        while time.monotonic() - started < deadline_s:
            stats = await t.decoder_stats()
            if stats["live_sequences"] == 0:
                return stats, time.monotonic() - started
            await asyncio.sleep(0.1)
        raise AssertionError(f"cache not freed after {deadline_s} s: {stats}")

    async def work():
        async with TritonCoca(server.grpc_url) as t:
            embeddings = (await t.image_embeddings(unique_jpegs(99, 1)))[0]
            baseline, _ = await wait_until_freed(t, 30)
            rss_before = None  # measured after the first round (the first decode allocates torch's pools)
            abandoned = refused = refused_by_service = 0
            freed_after = []
            next_id = 1_000_000
            while abandoned < sequences:
                n = min(CAPACITY, sequences - abandoned)
                ids = range(next_id, next_id + n + (BEYOND if n == CAPACITY else 0))
                next_id += len(ids)
                outcomes = await asyncio.gather(*(start(t, i, embeddings) for i in ids), return_exceptions=True)
                ok = [o for o in outcomes if o is None]
                errors = [o for o in outcomes if o is not None]
                assert len(ok) == n, errors[:3]
                for error in errors:  # beyond the cap: a clear error, nothing else
                    assert isinstance(error, CapacityError) and "decoder cache full" in str(error), repr(error)
                refused += len(errors)
                if n == CAPACITY:  # the TTL (IDLE_S + 0.5 s) has not passed: still full
                    error = await asyncio.to_thread(caption_through_the_service)
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                    assert "decoder cache full" in error.details(), error.details()
                    refused_by_service += 1
                full = await t.decoder_stats()
                assert full["live_sequences"] >= n
                abandoned += n
                stats, waited = await wait_until_freed(t, IDLE_S + 0.5 + 4 * EXPIRY_INTERVAL_S + 10)
                freed_after.append(waited)
                rss_before = rss_before or rss_bytes(pid)
                assert (stats["free_rows"], stats["cache_bytes_in_use"]) == (CAPACITY, baseline["cache_bytes_in_use"])
            after = await t.decoder_stats()
            tokens = (await t.caption(embeddings, SamplingParams(max_tokens=8))).tokens  # still decodes
            return (baseline, after, rss_before, rss_bytes(pid), abandoned, refused, refused_by_service, freed_after,
                    tokens)

    with service:
        baseline, after, rss_before, rss_after, abandoned, refused, refused_by_service, freed_after, tokens = \
            asyncio.run(work())
    assert tokens and server.is_alive()
    assert after["live_sequences"] == baseline["live_sequences"] == 0
    assert after["cache_bytes_in_use"] == baseline["cache_bytes_in_use"] == 0
    assert after["expired_by_timer"] + after["expired_by_execute"] - \
        (baseline["expired_by_timer"] + baseline["expired_by_execute"]) >= abandoned
    assert rss_after - rss_before < 64 << 20, (rss_before, rss_after)  # no per-sequence leak
    assert refused_by_service >= 1
    figures.record(f"decoder: {sequences} abandoned sequences", abandoned=abandoned, refused_past_cap=refused,
                   service_captions_refused_resource_exhausted=refused_by_service,
                   capacity_rows=CAPACITY, ttl_s=IDLE_S + 0.5, freed_within_s_max=round(max(freed_after), 2),
                   live_after=after["live_sequences"], cache_bytes_in_use_after=after["cache_bytes_in_use"],
                   decoder_rss_mb_before=round(rss_before / 2**20, 1), decoder_rss_mb_after=round(rss_after / 2**20, 1))
