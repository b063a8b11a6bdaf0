"""The CoCa models on a real tritonserver equal the in-process runtime, and fail request by request.

One server for the whole module: coca-tiny (random weights, seed 0) exported to a temp
repository with a small decoder cache and a short idle timeout, and with both decoders: the caption
tests run over each scheduler (coca_text_decoder's step protocol, coca_captioner's stream).
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path

import numpy as np
import pytest

from coca.errors import CapacityError, InvalidInputError
from serving.repository import DecoderSettings, export_repository
from coca.sampling import SamplingParams
from serving.testing import run_bounded, running_triton, triton_unavailable_reason

pytest.importorskip("tritonclient.grpc.aio")
from serving.client import TritonCoca, _array_input, _start_inputs  # noqa: E402
from serving.errors import IdentityMismatchError, SequenceLostError, TritonRequestError, TritonUnavailableError  # noqa: E402
from serving.protocol import CAPTIONER, STEP_OUTPUTS, TEXT_DECODER  # noqa: E402

pytestmark = pytest.mark.skipif(bool(triton_unavailable_reason()), reason=str(triton_unavailable_reason()))

CAPACITY = 24  # cache rows: 8 captions + 2 beam searches of 6 fit; the cap test fills them all
IDLE_S = 2.0  # Triton forgets a silent sequence; the model's TTL is IDLE_S + 0.5
EXPIRY_INTERVAL_S = 0.25
GREEDY = SamplingParams(max_tokens=12)
SAMPLED = SamplingParams(temperature=0.75, top_k=40, top_p=0.5, seed=5, max_tokens=12)  # exact in float32
BEAMS = SamplingParams(max_tokens=10, num_beams=6, num_beam_groups=3)
# The step protocol in CI; these tests under coca_captioner too in make test-reliability (-m long): its own
# tests below cover it in CI (CI time budget).
SCHEDULERS = pytest.mark.parametrize("scheduler", ["sequence", pytest.param("iterative", marks=pytest.mark.long)])


@pytest.fixture(scope="module")
def repository(tiny_coca, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("model_repository")
    settings = DecoderSettings(capacity_rows=CAPACITY, sequence_idle_s=IDLE_S, expiry_interval_s=EXPIRY_INTERVAL_S,
                               scheduler="iterative")
    export_repository(tiny_coca, repo, decoder=settings)
    return repo


@pytest.fixture(scope="module")
def triton(repository):
    """The module's server, on ports it keeps: the restart test kills it and starts it again at the same address."""
    with running_triton(repository, keep_ports=True) as (grpc_url, _, server):
        yield grpc_url, server


@pytest.fixture(scope="module")
def photos(images) -> list[bytes]:
    return [Path(p).read_bytes() for p in images]


def on_triton(url: str, work, scheduler: str = "auto"):
    """Run `await work(client)` with a fresh TritonCoca in a fresh event loop."""

    async def go():
        async with TritonCoca(url, scheduler=scheduler) as triton:
            return await work(triton)

    return run_bounded(go())


async def start(triton: TritonCoca, sequence_id: int, embeddings: np.ndarray, params=GREEDY):
    inputs = _start_inputs(embeddings, params)
    return await triton._infer(TEXT_DECODER, inputs, STEP_OUTPUTS, sequence_id=sequence_id, sequence_start=True)


async def end(triton: TritonCoca, sequence_id: int):
    await triton._end(sequence_id)


# --- identity --------------------------------------------------------------------------------
def test_identity_is_read_and_a_mismatch_refused(triton):
    url, _ = triton
    identity = on_triton(url, lambda t: t.check_identity("coca-tiny", "random"))
    assert (identity.model, identity.pretrained, identity.dtype, identity.embed_dim) == ("coca-tiny", "random", "float32", 64)
    with pytest.raises(IdentityMismatchError, match="serves coca-tiny .*not the expected model 'coca_ViT-B-32'"):
        on_triton(url, lambda t: t.check_identity("coca_ViT-B-32"))
    with pytest.raises(IdentityMismatchError, match="not the expected weights 'laion2b_s13b_b90k'"):
        on_triton(url, lambda t: t.check_identity("coca-tiny", "laion2b_s13b_b90k"))


def test_unreachable_server_is_a_typed_error():
    with pytest.raises(TritonUnavailableError, match="cannot reach Triton at 127.0.0.1:1"):
        on_triton("127.0.0.1:1", lambda t: t.embed_texts(["a dog"]))


# --- encoders --------------------------------------------------------------------------------
def test_image_outputs_equal_in_process(triton, tiny_coca, images, photos):
    url, _ = triton

    async def work(t):
        return await asyncio.gather(t.embed_images(photos), t.image_embeddings(photos), t.image_attention(photos[:2]))

    class_embeddings, image_embeddings, attention = on_triton(url, work)
    expected = tiny_coca.encode_images(images, want_attention=True)
    np.testing.assert_allclose(class_embeddings, tiny_coca.embed_images(images), atol=1e-5, rtol=0)
    np.testing.assert_allclose(image_embeddings, expected.image_embeddings.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(attention, expected.attention[:2].numpy(), atol=1e-5, rtol=0)


def test_text_outputs_equal_in_process(triton, tiny_coca):
    url, _ = triton
    texts = ["a dog", "an astronaut in a white suit next to a flag", "coffee"]

    async def work(t):
        return await asyncio.gather(t.embed_texts(texts), t.text_attention(texts[1:]))

    embeddings, (attention, tokens) = on_triton(url, work)
    np.testing.assert_allclose(embeddings, tiny_coca.embed_texts(texts), atol=1e-5, rtol=0)
    expected = tiny_coca.encode_texts(texts[1:], want_attention=True)
    np.testing.assert_allclose(attention, expected.attention[-1].numpy(), atol=1e-5, rtol=0)
    assert tokens.tolist() == expected.kept_tokens.tolist()


def test_a_corrupt_image_fails_alone_in_its_batch(triton, tiny_coca, images, photos):
    url, _ = triton
    corrupt = photos[0][:200]  # a truncated JPEG

    async def work(t):  # concurrent requests: the dynamic batcher puts them in one execute()
        return await asyncio.gather(*(t.embed_images([p]) for p in [photos[0], corrupt, *photos[1:]]),
                                    return_exceptions=True)

    outcomes = on_triton(url, work)
    assert isinstance(outcomes[1], InvalidInputError) and "image" in str(outcomes[1]).lower(), outcomes[1]
    good = np.concatenate([outcomes[0], *outcomes[2:]])
    np.testing.assert_allclose(good, tiny_coca.embed_images(images), atol=1e-5, rtol=0)


def test_an_empty_text_fails_alone(triton, tiny_coca):
    url, _ = triton

    async def work(t):
        return await asyncio.gather(t.embed_texts(["a cat"]), t.embed_texts(["  "]), return_exceptions=True)

    good, empty = on_triton(url, work)
    assert isinstance(empty, InvalidInputError) and "text #1 is empty" in str(empty)
    np.testing.assert_allclose(good, tiny_coca.embed_texts(["a cat"]), atol=1e-5, rtol=0)


def test_texts_over_the_length_bound_fail_alone(triton, tiny_coca):
    """A direct Triton caller cannot feed the tokenizer megabytes (its BPE is quadratic in a word's length)."""
    from coca.texts import MAX_TEXT_CHARS

    url, _ = triton
    at_bound = "a cat " * (MAX_TEXT_CHARS // 6) + "x" * (MAX_TEXT_CHARS % 6)

    async def work(t):
        return await asyncio.gather(t.embed_texts([at_bound]), t.embed_texts(["q" * (MAX_TEXT_CHARS + 1)]),
                                    return_exceptions=True)

    good, long = on_triton(url, work)
    assert isinstance(long, InvalidInputError) and f"over the limit of {MAX_TEXT_CHARS}" in str(long), long
    np.testing.assert_allclose(good, tiny_coca.embed_texts([at_bound]), atol=1e-5, rtol=0)


# --- captions --------------------------------------------------------------------------------
@SCHEDULERS
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_captions_equal_in_process(triton, tiny_coca, images, photos, params, scheduler):
    url, _ = triton
    captions = on_triton(url, lambda t: t.caption_many(photos, params), scheduler)
    expected = [tiny_coca.caption([image], params)[0] for image in images]
    assert [c.tokens for c in captions] == [c.tokens for c in expected]
    assert [c.text for c in captions] == [c.text for c in expected]
    for got, want in zip(captions, expected):  # float32 both; other rows in the batch may change the sums
        assert len(got.logprobs) == len(want.logprobs) and any(got.logprobs)
        np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-4)


@SCHEDULERS
def test_beam_search_equals_in_process(triton, tiny_coca, images, photos, scheduler):
    url, _ = triton
    captions = on_triton(url, lambda t: t.caption_many(photos[:2], BEAMS), scheduler)
    assert [c.tokens for c in captions] == [tiny_coca.caption([i], BEAMS)[0].tokens for i in images[:2]]


def test_video_caption_equals_in_process(triton, tiny_coca, tmp_path):
    from tests.test_model_equality import make_video

    url, _ = triton
    video = make_video(tmp_path / "clip.mp4")
    got = on_triton(url, lambda t: t.caption_video(video.read_bytes(), frames=4, params=GREEDY))
    expected = tiny_coca.caption_video(str(video), frames=4, params=GREEDY)
    assert (got.text, got.tokens) == (expected.text, expected.tokens)


@SCHEDULERS
def test_eight_interleaved_sequences_share_forwards(triton, tiny_coca, images, photos, scheduler):
    url, _ = triton
    settings = [GREEDY if i % 2 == 0 else SAMPLED for i in range(8)]

    async def work(t):
        embeddings = await t.image_embeddings(photos)

        async def one(i):
            await asyncio.sleep(0.003 * i)  # staggered: sequences at different positions share a forward
            return await t.generate(embeddings[i % 4], settings[i])

        return await asyncio.gather(*(one(i) for i in range(8)))

    generations = on_triton(url, work, scheduler)
    for i, generation in enumerate(generations):
        assert generation.tokens == tiny_coca.caption([images[i % 4]], settings[i])[0].tokens, f"sequence {i}"
    rows = [r for g in generations for r in g.batch_rows]
    assert max(rows) > 1, f"every forward computed one row: {rows}"


@SCHEDULERS
def test_a_failing_caption_fails_alone_in_its_triton_batch(triton, tiny_coca, images, photos, scheduler):
    """Sequences whose scores turn NaN (finite but huge image embeddings: they pass the START checks)
    share forwards with good ones; only they fail, and the good ones equal in-process greedy. Before,
    a sampled NaN row made torch.multinomial raise in the batched step, failing every caption in it."""
    url, _ = triton
    # The same inputs at START (Triton batches only requests with the same set of inputs): a seed
    # and a temperature for both; temperature 0 is greedy.
    greedy = SamplingParams(temperature=0.0, seed=1, max_tokens=12)
    nan_prone = SamplingParams(temperature=1.0, seed=1, max_tokens=12)
    expected = [tiny_coca.caption([i], greedy)[0].tokens for i in images]

    async def work(t):
        embeddings = await t.image_embeddings(photos)
        huge = np.full_like(embeddings[0], 1e20)
        huge[..., ::2] = -1e20
        rounds = []
        for _ in range(3):  # until a failing START shared a forward with good ones (the first, in practice)
            outcomes = await asyncio.gather(*(t.generate(e, greedy) for e in embeddings),
                                            *(t.generate(huge, nan_prone) for _ in embeddings), return_exceptions=True)
            rounds.append((outcomes[:len(photos)], outcomes[len(photos):]))
            if max((g.batch_rows[0] for g in rounds[-1][0] if not isinstance(g, Exception)), default=0) > len(photos):
                break
        return rounds

    rounds = on_triton(url, work, scheduler)
    for good, bad in rounds:
        for outcome in bad:
            assert isinstance(outcome, InvalidInputError) and "NaN or infinite" in str(outcome), outcome
        assert [g.tokens if not isinstance(g, Exception) else g for g in good] == expected
    first_steps = [g.batch_rows[0] for good, _ in rounds for g in good]  # rows of each good caption's first forward
    assert max(first_steps) > len(photos), f"no failing caption shared a forward with the good ones: {first_steps}"
    stats = on_triton(url, lambda t: t.captioner_stats() if scheduler == "iterative" else t.decoder_stats())
    assert stats["free_rows"] == CAPACITY


def test_caption_files_is_what_the_cli_prints(triton, tiny_coca, images, tmp_path):
    from serving.client import caption_files
    from tests.test_model_equality import make_video

    url, _ = triton
    video = str(make_video(tmp_path / "clip.mp4"))
    captions = list(caption_files(url, [images[0], video], GREEDY, frames=4))
    assert captions == [(images[0], tiny_coca.caption([images[0]], GREEDY)[0].text),
                        (video, tiny_coca.caption_video(video, frames=4, params=GREEDY).text)]


def test_a_cancelled_caption_still_ends_its_sequence(triton, photos):
    url, _ = triton

    async def work(t):
        embeddings = (await t.image_embeddings(photos[:1]))[0]
        before = await t.decoder_stats()
        task = asyncio.create_task(t.generate(embeddings, SamplingParams(max_tokens=70, min_tokens=70)))
        while (await t.decoder_stats())["live_sequences"] == before["live_sequences"]:
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # returns once the shielded END has been answered
        return before, await t.decoder_stats()

    before, after = on_triton(url, work, "sequence")
    assert (after["live_sequences"], after["free_rows"]) == (before["live_sequences"], before["free_rows"])


# --- coca_captioner: iterative scheduling ----------------------------------------------------------
LONG_GREEDY = SamplingParams(max_tokens=24, min_tokens=24)  # long enough for 16 streams to open meanwhile


async def streamed(t: TritonCoca, embeddings: np.ndarray, params=LONG_GREEDY) -> list:
    async with contextlib.aclosing(t.captioner_steps(embeddings, params)) as steps:
        return [step async for step in steps]


async def captioner_settles(t: TritonCoca, timeout: float = 10.0) -> dict:
    """The captioner's stats once no caption is live or waiting (it frees a cancelled one at its next round)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await t.captioner_stats()
        if stats["live_sequences"] == stats["waiting_sequences"] == 0 or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("concurrent", [16, 32])
def test_streamed_greedy_captions_equal_in_process_alone_and_many_at_once(triton, tiny_coca, images, photos,
                                                                         concurrent):
    """Batch invariance: each caption open_clip's whatever shares its forwards; 32 is over the CAPACITY rows,
    so the captions past it wait, then join forwards already under way."""
    url, _ = triton
    expected = tiny_coca.caption(images, LONG_GREEDY)

    async def work(t):
        embeddings = await t.image_embeddings(photos)
        alone = await streamed(t, embeddings[0])
        together = await asyncio.gather(*(streamed(t, embeddings[i % 4]) for i in range(concurrent)))
        return alone, together, await t.captioner_stats()

    alone, together, stats = on_triton(url, work, "iterative")
    assert [s.batch_rows for s in alone] == [1] * len(alone)
    for i, steps in enumerate([alone, *together]):
        want = expected[(i - 1) % 4 if i else 0]
        assert (steps[-1].tokens, steps[-1].text) == (want.tokens, want.text), f"caption {i}"
        assert [s.done for s in steps] == [False] * (len(steps) - 1) + [True]
        # one token a step (the last step adds the forced EOS too), with its text so far
        assert [s.tokens for s in steps[:-1]] == [want.tokens[: n + 1] for n in range(len(steps) - 1)]
        assert [s.token for s in steps] == [s.tokens[-1] for s in steps]
        assert [s.text for s in steps[:-1]] == [tiny_coca.text_so_far(s.tokens) for s in steps[:-1]]
        np.testing.assert_allclose(steps[-1].logprobs, want.logprobs, rtol=0, atol=1e-4)
    widest = min(concurrent, CAPACITY)
    assert max(s.batch_rows for steps in together for s in steps) == widest, f"never {widest} captions in a forward"
    assert (stats["live_sequences"], stats["free_rows"]) == (0, CAPACITY)


def test_a_bad_streamed_caption_fails_alone(triton, tiny_coca, images, photos):
    url, server = triton

    async def request(t, inputs):
        async def one():
            yield {"model_name": CAPTIONER, "inputs": inputs}
        async for _, error in t.client.stream_infer(one()):
            return t._translate_streamed(error.message()) if error else None

    async def work(t):
        embeddings = (await t.image_embeddings(photos[:1]))[0]
        nan = embeddings.copy()
        nan[0, 0] = np.nan
        huge = np.full_like(embeddings, 1e20)
        huge[..., ::2] = -1e20
        outcomes = await asyncio.gather(
            streamed(t, embeddings), streamed(t, embeddings[:10]), streamed(t, nan),
            request(t, [_array_input("IMAGE_EMBEDDINGS", embeddings[None]), _array_input("TEMPERATURE", np.array([[-1]], np.float32))]),
            streamed(t, huge, SamplingParams(temperature=1.0, seed=1)),
            request(t, [_array_input("IMAGE_EMBEDDINGS", embeddings[None].astype(np.float64))]),
            return_exceptions=True)
        return outcomes, await captioner_settles(t)

    (good, *bad), stats = on_triton(url, work, "iterative")
    assert good[-1].tokens == tiny_coca.caption(images[:1], LONG_GREEDY)[0].tokens
    for outcome, match in zip(bad, [r"IMAGE_EMBEDDINGS must have shape \[1, 255, 64\].*got \[1, 10, 64\]",
                                    "NaN or infinite values", r"temperature must be 0 \(greedy\) or in",
                                    "caption failed: .*NaN or infinite", "data-type is 'FP64'"]):
        assert isinstance(outcome, InvalidInputError), outcome
        assert re.search(match, str(outcome)) and str(outcome).startswith(CAPTIONER), outcome
    assert (stats["live_sequences"], stats["free_rows"]) == (0, CAPACITY)
    assert server.is_alive()


def test_a_cancelled_or_disconnected_stream_frees_its_caption(triton, photos):
    url, _ = triton
    endless = SamplingParams(max_tokens=70, min_tokens=70)

    async def work(t):
        embeddings = (await t.image_embeddings(photos[:1]))[0]
        before = await t.captioner_stats()
        async with contextlib.aclosing(t.captioner_steps(embeddings, endless)) as steps:
            async for step in steps:
                break  # the caller stops reading: the request is cancelled
        after_cancel = await captioner_settles(t)
        other = TritonCoca(url, scheduler="iterative")  # a client that goes away mid-caption
        task = asyncio.create_task(streamed(other, embeddings, endless))
        while (await t.captioner_stats())["live_sequences"] == 0:
            await asyncio.sleep(0.005)
        await other.close()
        with pytest.raises(TritonUnavailableError, match="closed during the call"):
            await task
        return step, before, after_cancel, await captioner_settles(t)

    step, before, after_cancel, after_disconnect = on_triton(url, work, "iterative")
    assert not step.done and len(step.tokens) == 1
    for after in (after_cancel, after_disconnect):
        assert (after["live_sequences"], after["free_rows"]) == (0, CAPACITY)
    assert after_disconnect["cancelled"] >= before["cancelled"] + 2


@pytest.mark.long  # the module's server killed and started again (~30 s on a busy 2-core box)
def test_a_streamed_caption_cut_by_a_triton_restart_fails_cleanly_and_captions_work_after(triton, tiny_coca,
                                                                                          images, photos):
    """Triton SIGKILLed (with its stubs) mid-caption: the stream fails at once with TritonUnavailableError
    naming Triton, not at its deadline (one server: nothing to start it again on; a pool does, see
    tests/test_triton_pool.py). Started again on the same address, the same client captions again, equal to
    the in-process caption, and the new captioner holds no caption. (The module's server: a server of its own
    was one more start and stop, ~45 s of a busy box.)"""
    endless = SamplingParams(max_tokens=70, min_tokens=70)
    expected = tiny_coca.caption(images[:1], LONG_GREEDY)[0]
    server = triton[1]

    try:
        async def work(t):
            embeddings = (await t.image_embeddings(photos[:1]))[0]
            steps = []
            with pytest.raises(TritonUnavailableError, match="Triton") as cut:
                async with contextlib.aclosing(t.captioner_steps(embeddings, endless)) as stream:
                    async for step in stream:
                        steps.append(step)
                        if len(steps) == 3:
                            killed = time.monotonic()
                            server.kill()
            failed_after_s = time.monotonic() - killed
            server.start()  # from this thread: a server dies with the thread that started it
            deadline = time.monotonic() + 60
            while True:  # the channel reconnects after its backoff from the refused connections
                try:
                    after = await streamed(t, embeddings)
                    break
                except TritonUnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.25)
            return steps, cut.value, failed_after_s, after, await t.captioner_stats()

        steps, error, failed_after_s, after, stats = on_triton(server.grpc_url, work, "iterative")
    finally:
        server.ensure_running()  # the module's later tests need it
    assert len(steps) == 3 and not steps[-1].done
    assert failed_after_s < 10, f"the cut stream failed {failed_after_s:.1f} s after the kill: {error}"
    assert (after[-1].tokens, after[-1].text) == (expected.tokens, expected.text)
    assert (stats["live_sequences"], stats["free_rows"]) == (0, CAPACITY)


# --- memory: TTL and cap ---------------------------------------------------------------------
def test_abandoned_sequences_are_freed_after_the_ttl(triton, photos):
    url, server = triton

    async def abandon(t):
        embeddings = await t.image_embeddings(photos[:1])
        for sequence_id in (7001, 7002):
            await start(t, sequence_id, embeddings[0])  # ...and never END
        return await t.decoder_stats()

    before = on_triton(url, abandon)
    assert before["live_sequences"] >= 2 and before["free_rows"] <= CAPACITY - 2
    time.sleep(IDLE_S + 0.5 + 2 * EXPIRY_INTERVAL_S + 0.5)  # past the model's TTL, timer included
    assert "(by timer)" in server.log_tail(200)
    after = on_triton(url, lambda t: t.decoder_stats())
    assert after["expired_by_timer"] >= 2
    assert (after["live_sequences"], after["free_rows"], after["cache_bytes_in_use"]) == (0, CAPACITY, 0)
    with pytest.raises(SequenceLostError, match="START"):  # Triton forgot it too
        on_triton(url, lambda t: t._infer(TEXT_DECODER, [], STEP_OUTPUTS, sequence_id=7001))


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_a_caption_forgotten_while_its_client_stalled_is_started_again(triton, tiny_coca, images, photos, params):
    """A client starved between two steps for longer than the idle limit: Triton drops the sequence. A
    reproducible caption starts again and goes on where it was: each step handed out once, the caption
    open_clip's; an unseeded sample cannot, and says so."""
    url, _ = triton
    steps = on_triton(url, lambda t: stalled(t, photos[0], params), "sequence")
    assert steps == on_triton(url, lambda t: stalled(t, photos[0], params, stall_s=0), "sequence")
    expected = tiny_coca.caption([images[0]], params)[0]
    assert steps[-1] == (expected.tokens, expected.text, True) and len(steps) > 3
    with pytest.raises(SequenceLostError, match="does not know the caption's sequence.*ask again"):
        on_triton(url, lambda t: stalled(t, photos[0], UNSEEDED), "sequence")


@pytest.mark.long  # the step protocol's variant above runs in CI
def test_a_streamed_caption_outlives_its_client_stalling_past_the_idle_limit(triton, tiny_coca, images, photos):
    """coca_captioner holds a caption for its stream, not for an idle limit: a client starved between two
    steps for longer than the step protocol's idle limit gets the whole caption, each step once, open_clip's
    for greedy and seeded ones; an unseeded sample, which the step protocol cannot resume, finishes too."""
    url, _ = triton
    for params in (GREEDY, SAMPLED):
        steps = on_triton(url, lambda t: stalled(t, photos[0], params), "iterative")
        expected = tiny_coca.caption([images[0]], params)[0]
        assert steps[-1] == (expected.tokens, expected.text, True) and len(steps) > 3
        assert [tokens for tokens, _, _ in steps] == [expected.tokens[:len(tokens)] for tokens, _, _ in steps]
        assert len({len(tokens) for tokens, _, _ in steps}) == len(steps), "a step handed out twice"
    unseeded = on_triton(url, lambda t: stalled(t, photos[0], UNSEEDED), "iterative")
    assert unseeded[-1][2] and len(unseeded[-1][0]) > 2
    stats = on_triton(url, lambda t: t.captioner_stats())
    assert (stats["live_sequences"], stats["free_rows"]) == (0, CAPACITY)


UNSEEDED = SamplingParams(temperature=0.75, top_k=40, max_tokens=12)


async def stalled(t: TritonCoca, photo: bytes, params: SamplingParams, stall_s: float = IDLE_S + 1.5) -> list:
    """A caption's steps (tokens, text, done), read by a client that stalls `stall_s` after the second one
    (by default past Triton's idle limit and the decoder's TTL)."""
    steps = []
    async with contextlib.aclosing(t.caption_steps(photo, params)) as generations:
        async for generation in generations:
            steps.append((list(generation.tokens), generation.text, generation.done))
            if len(steps) == 2:
                await asyncio.sleep(stall_s)
    return steps


def test_the_cache_cap_is_a_clear_error(triton, tiny_coca, images, photos):
    url, _ = triton

    async def work(t):
        embeddings = (await t.image_embeddings(photos[:1]))[0]
        ids = list(range(8001, 8001 + CAPACITY))
        try:
            await asyncio.gather(*(start(t, i, embeddings) for i in ids))  # one row each: the cache is full
            with pytest.raises(CapacityError, match=f"decoder cache full: 1 slot\\(s\\) wanted, 0 free.*{CAPACITY} live"):
                await start(t, 9000, embeddings)
            stats = await t.decoder_stats()  # a probe needs no cache row
        finally:
            await asyncio.gather(*(end(t, i) for i in [*ids, 9000]))
        return stats, await t.decoder_stats(), await t.caption(embeddings, GREEDY)

    full, freed, caption = on_triton(url, work)
    assert full["free_rows"] == 0 and freed["free_rows"] == CAPACITY
    assert caption.tokens == tiny_coca.caption(images[:1], GREEDY)[0].tokens


# --- malformed requests ----------------------------------------------------------------------
def test_malformed_decoder_requests_fail_alone_and_the_server_keeps_serving(triton, tiny_coca, images, photos):
    url, server = triton

    async def expect(error_type, match, request):
        with pytest.raises(error_type, match=match):
            await request

    async def work(t):
        embeddings = (await t.image_embeddings(photos[:1]))[0]
        try:
            await expect(SequenceLostError, "must specify the START flag",
                         t._infer(TEXT_DECODER, [], STEP_OUTPUTS, sequence_id=9101))
            await expect(InvalidInputError, "data-type is 'FP64'", t._infer(
                TEXT_DECODER, [_array_input("IMAGE_EMBEDDINGS", embeddings[None].astype(np.float64))],
                STEP_OUTPUTS, sequence_id=9102, sequence_start=True))
            await expect(InvalidInputError, r"IMAGE_EMBEDDINGS must have shape \[1, 255, 64\].*got \[1, 10, 64\]",
                         start(t, 9103, embeddings[:10]))
            await expect(InvalidInputError, "unexpected shape", start(t, 9104, embeddings[:, :32]))
            await expect(InvalidInputError, "needs IMAGE_EMBEDDINGS", t._infer(
                TEXT_DECODER, [_array_input("MAX_TOKENS", np.array([[5]], np.int32))], STEP_OUTPUTS,
                sequence_id=9105, sequence_start=True))
            bad_settings = [_array_input("IMAGE_EMBEDDINGS", embeddings[None]),
                            _array_input("TEMPERATURE", np.array([[-1]], np.float32)),
                            _array_input("TOP_P", np.array([[0]], np.float32))]
            await expect(InvalidInputError, r"temperature must be 0 \(greedy\) or in \[0.01, 100\], got -1.0.*top_p must be in", t._infer(
                TEXT_DECODER, bad_settings, STEP_OUTPUTS, sequence_id=9106, sequence_start=True))
            # Triton still holds 9106 (its START reached the model), the model does not:
            await expect(TritonRequestError, "unknown sequence 9106: it was never started here",
                         t._infer(TEXT_DECODER, [], STEP_OUTPUTS, sequence_id=9106))
        finally:
            await asyncio.gather(*(end(t, i) for i in range(9101, 9107)))
        return await t.caption(embeddings, GREEDY), await t.decoder_stats()

    caption, stats = on_triton(url, work)
    assert caption.tokens == tiny_coca.caption(images[:1], GREEDY)[0].tokens
    assert stats["free_rows"] == CAPACITY
    assert server.is_alive()
