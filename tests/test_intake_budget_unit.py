"""The AddImages intake budget (search_service/service.py IntakeBudget, StreamHold, _read_stream) without
Triton or gRPC: the readers of real streams, fed by stand-in request iterators whose "messages" are their sizes.

Review item 1: a stream that reserved room for one item (~33 MiB) and then received a larger message (up to the
64 MiB message limit) used to wait for the excess while holding its reservation, queued behind another stream
that waited for room the first held: neither moved, and every client's ingest hung. Both tests below hang
(bounded by wait_for: they fail) or fail on that code."""
from __future__ import annotations

import asyncio

from search_service.service import IntakeBudget, _read_stream

MIB = 1 << 20
WAIT_S = 5.0  # a deadlocked reader never gets there; a working one takes microseconds


def reads(stream):
    """_read_stream's `read` of an async iterator of stand-in messages (None at its end)."""
    messages = stream.__aiter__()

    async def read():
        try:
            return await messages.__anext__()
        except StopAsyncIteration:
            return None

    return read


async def _until(condition, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never reached: {what}")


def test_a_message_bigger_than_its_reservation_does_not_deadlock_two_streams():
    async def scenario():
        budget = IntakeBudget(64 * MIB, 33 * MIB)  # --intake-mb 64; the reservation of one item: 33 MiB
        message_arrives = asyncio.Event()

        async def first_stream():
            await message_arrives.wait()  # arrives once the second stream queues for room
            yield 40 * MIB  # larger than its reservation (valid protobuf up to the 64 MiB message limit)

        async def second_stream():
            yield 1 * MIB

        queues = asyncio.Queue(), asyncio.Queue()
        holds = budget.stream_hold(), budget.stream_hold()
        readers = [asyncio.create_task(_read_stream(reads(first_stream()), queues[0], holds[0], lambda size: size))]
        await _until(lambda: budget.held == 33 * MIB, "the first stream reserved its item")
        readers.append(asyncio.create_task(_read_stream(reads(second_stream()), queues[1], holds[1], lambda size: size)))
        await _until(lambda: budget._waiting, "the second stream queued for 33 MiB with 31 free")
        message_arrives.set()
        try:
            index, size = await asyncio.wait_for(queues[0].get(), WAIT_S)  # the old code: hangs here
            assert (index, size) == (0, 40 * MIB)
            assert budget.held == 40 * MIB and budget.peak == 40 * MIB  # the message's bytes, accounted
            holds[0].give_back(index)  # its batch is done: the second stream gets room and is read
            assert await asyncio.wait_for(queues[1].get(), WAIT_S) == (0, 1 * MIB)
            assert await asyncio.wait_for(queues[0].get(), WAIT_S) is None  # both streams end
            holds[1].give_back(0)
            assert await asyncio.wait_for(queues[1].get(), WAIT_S) is None
            await asyncio.wait_for(asyncio.gather(*readers), WAIT_S)
            assert budget.held == 0
        finally:
            for reader in readers:
                reader.cancel()

    asyncio.run(scenario())


def test_an_over_commit_past_the_limit_makes_later_acquires_wait_until_it_is_back_under():
    async def scenario():
        budget = IntakeBudget(64 * MIB, 33 * MIB)
        assert await budget.acquire(31 * MIB) == 31 * MIB  # another stream's item
        hold = budget.stream_hold()
        await asyncio.wait_for(hold.take(0, 33 * MIB), WAIT_S)
        settled = hold.settle(0, 60 * MIB)  # 27 MiB past the reservation, with nothing free: at once
        if asyncio.iscoroutine(settled):
            await asyncio.wait_for(settled, WAIT_S)  # the old code waits here for room that never frees
        assert budget.held == 91 * MIB and budget.peak == 91 * MIB  # over the limit, and accounted
        later = asyncio.create_task(budget.acquire(1 * MIB))
        await asyncio.sleep(0.01)
        assert not later.done()  # still 91 MiB held of 64: no room for anyone
        budget.release(31 * MIB)  # 60 MiB held: back under the limit, room for 1 more
        assert await asyncio.wait_for(later, WAIT_S) == 1 * MIB
        hold.give_back(0)
        budget.release(1 * MIB)
        assert budget.held == 0

    asyncio.run(scenario())


def test_a_reader_waiting_for_its_next_item_holds_no_message_the_budget_let_go_of():
    """A stream's reader gives its item to the batches, then waits for the next one (for room, or for the client
    to send it). The item's batch is done (its bytes given back to the budget) meanwhile: the item must be gone
    from memory then. (The old reader kept its last message in a local variable while it waited: one 32 MiB
    image per stream outside the budget.)"""
    import gc
    import weakref

    class Message:
        size = 30 * MIB

    async def scenario():
        budget = IntakeBudget(64 * MIB, 33 * MIB)
        next_sent = asyncio.Event()
        messages = [Message()]
        gone = weakref.ref(messages[0])

        async def stream():
            yield messages.pop()
            await next_sent.wait()
            yield Message()

        queue, hold = asyncio.Queue(), budget.stream_hold()
        reader = asyncio.create_task(_read_stream(reads(stream()), queue, hold, lambda message: message.size))
        try:
            index, message = await asyncio.wait_for(queue.get(), WAIT_S)
            await _until(lambda: budget.held == 30 * MIB + 33 * MIB, "the reader reserved room for its next item")
            hold.give_back(index)  # the item's batch is done
            del message
            gc.collect()
            assert gone() is None, "the reader still holds the message its batch let go of"
            next_sent.set()
            assert (await asyncio.wait_for(queue.get(), WAIT_S))[0] == 1
        finally:
            reader.cancel()

    asyncio.run(scenario())
