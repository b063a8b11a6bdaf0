"""Load shedding: 64 clients against a service that admits 8 searches at a time.

Every answer must be OK or RESOURCE_EXHAUSTED, each within 1 s (a refusal at once, never a queue that
times everyone out); the searches admitted must stay about as fast as when the service is not
overloaded; the service's RSS stays flat; the service's own metrics agree with what clients were told.
The same clients against the same service without a bound are measured beside it, for the contrast.

"Not overloaded" is the same search loop run by 8 clients (the bound: nothing is refused), in windows
between the windows of 64 (the machine is shared: make test-reliability runs another lane beside this one,
and only ratios measured side by side mean anything; a baseline taken just before and just after a 60 s
overload once met a quiet box and the overload a busy one, and the ratio read 4.6). Every client runs the
same schedule, bound and overload windows in turn, each client in the windows it belongs to; an answer counts
in a window when it started SETTLE_S after the window opened (the other clients' calls have ended) and ended
before it closed.

Times are asserted on PROBES of the clients, each alone in a process of its own, the same in every phase,
and on the service's own histogram. The other clients run 8 threads to a process, and there a thread whose
answer has arrived waits for its process's GIL behind its 7 siblings, and on 2 cores for the CPU behind 63
others: measured at load 12, those clients saw refusals (answered at once) take 592 ms at p99 and admitted
searches 1,036 ms, while the service's histogram held no admitted search over 1 s (8 of 5,214 over 0.5 s).
Their times are figures; a probe's time is the service's answer plus one idle process's wake-up."""
from __future__ import annotations

import multiprocessing
import random
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from .conftest import RssSampler, needs_triton, service_args, short, unique_jpegs

pytestmark = needs_triton

LIMIT, CLIENTS = 8, 64
ANSWER_WITHIN_S = 1.0
# the probes' admitted p99 in the windows of 64 clients <= this x their p99 in the windows of 8 (the bound,
# nothing shed), asserted in the long run. The refusals the 56 others keep asking for cost the 2 cores that
# the service, the clients and (in make test-reliability) the other lane share, so admitted searches do slow
# down: 2.8x measured alone, 2.7x to 4.3x with the other lane beside (13 runs; windows of 8 at 30-47 ms, of 64
# at 79-292 ms). What tells shedding from a pile-up is asserted in both runs: every probe's answer within 1 s,
# and the service's own clock (no admitted search over 1 s, no refusal over 0.5 s).
P99_FACTOR = 6.0
BACKOFF_S = (0.05, 0.15)  # a refused client waits this long (uniform) before it asks again
# The clients run in worker processes of at most this many threads (64 threads behind the test process's one
# GIL measured a 1.45 s answer as the service's), and PROBES of them alone in a process each.
THREADS_PER_PROCESS = 8
PROBES = 4
BOUND_WINDOW_S = 4  # each window of 8 clients; the overload's seconds are cut into OVERLOAD_WINDOWS between them
OVERLOAD_WINDOWS = {60: 5, 10: 2}
SETTLE_S = 1.0  # an answer counts in its window from this long after the window opened
CONTRAST_S = 10  # the unbounded service beside it: figures only, the same in 10 s as in 60
RSS_GROWTH_MB = 64  # after the first quarter of the run


@dataclass(frozen=True)
class Schedule:
    """Windows in order, each (name, seconds, clients): client n searches in a window while n < its clients."""

    windows: tuple[tuple[str, float, int], ...]

    @classmethod
    def steady(cls, clients: int, seconds: float) -> Schedule:
        return cls((("steady", seconds, clients),))

    @classmethod
    def alternating(cls, overload_s: float, windows: int) -> Schedule:
        """Bound, overload, bound, ... bound: `windows` of the overload, a bound window on each side of each."""
        bound, overload = ("bound", BOUND_WINDOW_S, LIMIT), ("overload", overload_s / windows, CLIENTS)
        return cls((bound, overload) * windows + (bound,))

    @property
    def seconds(self) -> float:
        return sum(s for _, s, _ in self.windows)

    @property
    def clients(self) -> int:
        return max(c for _, _, c in self.windows)

    def span(self, i: int) -> tuple[float, float]:
        start = sum(s for _, s, _ in self.windows[:i])
        return start, start + self.windows[i][1]

    def named(self, name: str) -> list[int]:
        return [i for i, (n, _, _) in enumerate(self.windows) if n == name]

    def next_turn(self, client: int, t: float) -> float | None:
        """When client `client` may next search, at `t` seconds into the schedule (t itself when now); None
        when its windows are over."""
        for i, (_, _, clients) in enumerate(self.windows):
            start, end = self.span(i)
            if client < clients and t < end:
                return max(t, start)
        return None

    def window_of(self, started: float, ended: float) -> int:
        """The window an answer counts in (-1: none; it straddled an edge or came before SETTLE_S)."""
        for i in range(len(self.windows)):
            start, end = self.span(i)
            if start + (SETTLE_S if i else 0) <= started and ended <= end:
                return i
        return -1


class Tally:
    """Every answer of a run: (seconds, status code, window); seconds NaN where not a search's time alone."""

    def __init__(self):
        self.answers: list[tuple[float, grpc.StatusCode, int]] = []
        self.lock = threading.Lock()

    def add(self, seconds: float, code: grpc.StatusCode, window: int) -> None:
        with self.lock:
            self.answers.append((seconds, code, window))

    def seconds(self, code: grpc.StatusCode, windows: list[int] | None = None) -> np.ndarray:
        return np.array([s for s, c, w in self.answers
                         if c == code and not np.isnan(s) and (windows is None or w in windows)])

    def slowest(self) -> tuple[float, grpc.StatusCode]:
        return max(((s, c) for s, c, _ in self.answers if not np.isnan(s)), key=lambda answer: answer[0])

    def codes(self, windows: list[int] | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, code, w in self.answers:
            if windows is None or w in windows:
                out[code.name] = out.get(code.name, 0) + 1
        return out


def search_loop(address: str, schedule: Schedule, tag: str, probes: int = 0) -> tuple[Tally, Tally]:
    """schedule.clients clients, each its own channel, searching texts nobody searched before (each one a
    Triton text-encoder call) in their windows of `schedule`; a refused client backs off BACKOFF_S before its
    next call. `probes` of them run alone in a process each, the others THREADS_PER_PROCESS to a process (all
    started, imports done, before the schedule begins; with no probes and few clients, threads of this
    process). Every answer, and the probes' answers."""
    clients = schedule.clients
    if not probes and clients <= THREADS_PER_PROCESS:
        return search_threads(address, range(clients), schedule, tag), Tally()
    groups = [range(n, n + 1) for n in range(probes)]
    groups += [range(first, min(first + THREADS_PER_PROCESS, clients)) for first in range(probes, clients, THREADS_PER_PROCESS)]
    everyone, probed = Tally(), Tally()
    spawn = multiprocessing.get_context("spawn")
    with spawn.Manager() as manager, ProcessPoolExecutor(len(groups), mp_context=spawn) as pool:
        # every worker imported: then all begin at one time of the machine's monotonic clock (a worker that
        # wakes late from the barrier on a busy box would otherwise run its windows late, into the others')
        ready, go, began = manager.Barrier(len(groups) + 1), manager.Event(), manager.Value("d", 0.0)
        parts = [pool.submit(search_answers, address, group, schedule, tag, (ready, go, began)) for group in groups]
        ready.wait(timeout=240)
        began.value = time.monotonic() + 0.2
        go.set()
        for n, part in enumerate(parts):
            for answer_s, code, window in part.result(timeout=schedule.seconds + 300):
                for tally in (everyone, probed) if n < probes else (everyone,):
                    tally.add(answer_s, grpc.StatusCode[code], window)
    return everyone, probed


def search_answers(address: str, numbers: range, schedule: Schedule, tag: str, start) -> list[tuple[float, str, int]]:
    """search_threads in a worker process from the common start, once every worker is ready: its answers as
    (seconds, code name, window)."""
    import search_service.testing  # noqa: F401  (what the clients import, before the common start)

    ready, go, began = start
    ready.wait(timeout=240)
    go.wait(timeout=240)
    return [(s, code.name, w) for s, code, w in search_threads(address, numbers, schedule, tag, began.value).answers]


def search_threads(address: str, numbers: range, schedule: Schedule, tag: str, began: float | None = None) -> Tally:
    """Clients `numbers`, a thread each, through `schedule` from time.monotonic() `began` (default now);
    each one's first answer (it connects) is not kept as a search's time."""
    tally = Tally()
    began = time.monotonic() if began is None else began

    def client(n: int):
        from search_service.testing import WireClient

        rng = random.Random(n)
        with WireClient(address, timeout=30) as c:
            i = 0
            while (turn := schedule.next_turn(n, now := time.monotonic() - began)) is not None:
                if turn > now:  # not this client's window: it waits for its next one
                    time.sleep(turn - now)
                    continue
                i += 1
                started = time.perf_counter()
                try:
                    c.search_text(f"{tag} client {n} query {i}", k=10)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                answer_s = time.perf_counter() - started
                window = schedule.window_of(now, time.monotonic() - began)
                # the first call also connects: counted, but in no window a search's time
                tally.add(answer_s if i > 1 else float("nan"), code, window)
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    time.sleep(rng.uniform(*BACKOFF_S))

    threads = [threading.Thread(target=client, args=(n,)) for n in numbers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(schedule.seconds + 60)
    return tally


def metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def served_over_s(url: str) -> dict[str, dict[str, float]]:
    """The service's own count of SearchText answers, from arrival to status, over 0.5 s and 1 s: admitted
    (OK) and refused (RESOURCE_EXHAUSTED)."""
    name = "coca_search_request_duration_seconds"
    return {code: {le: metric(url, f"{name}_count", method="SearchText", code=code)
                   - metric(url, f"{name}_bucket", method="SearchText", code=code, le=le) for le in ("0.5", "1.0")}
            for code in ("OK", "RESOURCE_EXHAUSTED")}


def p99_ms(values: np.ndarray) -> float:
    return round(float(np.percentile(values, 99)) * 1000, 1)


@pytest.mark.parametrize("seconds", [pytest.param(10, id="64x10s", marks=short),
                                     pytest.param(60, id="64x60s", marks=pytest.mark.long)])
def test_64_clients_against_a_limit_of_8(seconds, tmp_path, live_triton, exported, figures):
    from search_service.pb import search_pb2 as pb
    from search_service.testing import ServiceProcess, WireClient

    images = unique_jpegs(9100, 64)
    schedule = Schedule.alternating(seconds, OVERLOAD_WINDOWS[seconds])
    results = {}
    # 0: no bound, the contrast (figures only): the long run measures it; the quick one saves its ~20 s
    for bound in (LIMIT, 0) if seconds >= 60 else (LIMIT,):
        # refused at once past the bound (--max-queue-wait 0): the contract measured here is shedding's
        args = service_args(exported, "--max-inflight-search", str(bound), "--max-queue-wait", "0", "--metrics-port", "0")
        with ServiceProcess(tmp_path / f"data-{bound}", live_triton.grpc_url, *args) as service:
            with WireClient(service.address, timeout=120) as client:
                assert len(list(client.add_images(pb.AddImageRequest(image=i) for i in images))) == len(images)
            if bound:
                search_loop(service.address, Schedule.steady(LIMIT, 2), "warm-up")
                _, one = search_loop(service.address, Schedule.steady(1, 4), "one client", probes=1)
            peak = [0.0]
            watching = threading.Event()

            def watch_inflight():  # the service's own count of searches in flight, sampled through the run
                while not watching.wait(0.1):
                    peak[0] = max(peak[0], metric(service.metrics_url, "coca_search_inflight", **{"class": "search"}))

            watcher = threading.Thread(target=watch_inflight)
            watcher.start()
            over_before = served_over_s(service.metrics_url)
            shed_before = metric(service.metrics_url, "coca_search_shed_total", bound="search")
            with RssSampler(lambda: [service.proc.pid], interval=0.25) as rss:  # the contrast (figures only): 10 s
                everyone, probed = search_loop(service.address, schedule if bound else Schedule.steady(CLIENTS, CONTRAST_S),
                                               f"{CLIENTS} clients bound {bound}", probes=PROBES if bound else 0)
            watching.set()
            watcher.join()
            shed = metric(service.metrics_url, "coca_search_shed_total", bound="search") - shed_before
            served_over = {code: {le: after_ - over_before[code][le] for le, after_ in by_le.items()}
                           for code, by_le in served_over_s(service.metrics_url).items()}
            results[bound] = (everyone, probed, rss, peak[0], shed, served_over)

    everyone, probed, rss, peak, shed, served_over = results[LIMIT]
    OK, SHED = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
    at_bound, overload = schedule.named("bound"), schedule.named("overload")
    codes, overload_codes = everyone.codes(), everyone.codes(overload)
    admitted, refused = everyone.seconds(OK, overload), everyone.seconds(SHED, overload)
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert refused.size > 0 and admitted.size > 0 and probed.seconds(OK, overload).size > 0, overload_codes
    slowest, slowest_code = probed.slowest()
    p99_one, p99_bound = p99_ms(one.seconds(OK)), p99_ms(probed.seconds(OK, at_bound))
    p99_admitted = p99_ms(probed.seconds(OK, overload))
    mb = np.array(rss.values()) / 2**20
    quarter = mb[: max(1, len(mb) // 4)]

    figures.record(
        f"load shedding: {CLIENTS} clients x {seconds} s, --max-inflight-search {LIMIT}",
        answers=len(everyone.answers), ok=codes.get("OK", 0), resource_exhausted=codes.get("RESOURCE_EXHAUSTED", 0),
        other_codes=sum(n for c, n in codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")),
        windows=f"{len(overload)} of {CLIENTS} clients x {schedule.windows[overload[0]][1]:.0f} s between "
                f"{len(at_bound)} of {LIMIT} x {BOUND_WINDOW_S} s",
        probes_slowest_answer_ms=f"{slowest * 1000:.1f} ({slowest_code.name})",
        probes_admitted_p50_p99_ms=f"{np.percentile(probed.seconds(OK, overload), 50) * 1000:.0f} / {p99_admitted:.0f}",
        probes_p99_one_client_ms=p99_one, probes_p99_8_clients_ms=p99_bound,
        probes_p99_by_window_ms=[p99_ms(probed.seconds(OK, [w])) for w in range(len(schedule.windows))],
        probes_admitted_p99_over_8_clients=round(p99_admitted / p99_bound, 2),
        service_admitted_over_0_5_1_0_s=f"{served_over['OK']['0.5']:.0f} / {served_over['OK']['1.0']:.0f}",
        service_refusals_over_0_5_1_0_s=f"{served_over['RESOURCE_EXHAUSTED']['0.5']:.0f} / "
                                        f"{served_over['RESOURCE_EXHAUSTED']['1.0']:.0f}",
        all_clients_admitted_p50_p99_ms=f"{np.percentile(admitted, 50) * 1000:.0f} / {p99_ms(admitted):.0f}",
        all_clients_refusal_p99_ms=p99_ms(refused),
        all_clients_slowest_answer_ms=round(everyone.slowest()[0] * 1000, 1),
        all_clients_p99_8_clients_ms=p99_ms(everyone.seconds(OK, at_bound)),
        peak_inflight_seen=int(peak), admitted_per_s=round(overload_codes["OK"] / seconds, 1),
        service_rss_mb_min_max=f"{mb.min():.0f} / {mb.max():.0f}")
    if 0 in results:
        unbounded = results[0][0]
        all_unbounded = np.array([s for s, _, _ in unbounded.answers if not np.isnan(s)])
        figures.record(
            f"load shedding: {CLIENTS} clients x {seconds} s, --max-inflight-search {LIMIT}",
            unbounded_answers=len(unbounded.answers), unbounded_codes=str(unbounded.codes()),
            unbounded_p50_p99_ms=f"{np.percentile(all_unbounded, 50) * 1000:.0f} / {p99_ms(all_unbounded):.0f}",
            unbounded_slowest_ms=round(float(all_unbounded.max()) * 1000, 1),
            unbounded_peak_inflight=int(results[0][3]))
    assert slowest <= ANSWER_WITHIN_S, f"a probe's answer ({slowest_code.name}) took {slowest:.2f} s"
    assert 1 <= peak <= LIMIT and shed == codes["RESOURCE_EXHAUSTED"]  # the service's own count agrees with the clients'
    refused_at_bound = {w: everyone.codes([w]) for w in at_bound if set(everyone.codes([w])) != {"OK"}}
    assert set(one.codes()) == {"OK"} and not refused_at_bound, refused_at_bound  # not overloaded: nothing refused
    assert served_over["OK"]["1.0"] == 0 and served_over["RESOURCE_EXHAUSTED"]["0.5"] == 0, served_over
    assert mb.max() - quarter.max() < RSS_GROWTH_MB, f"service RSS grew from {quarter.max():.0f} to {mb.max():.0f} MB"
    if seconds >= 60:  # the short run's p99 is a handful of answers
        assert p99_admitted <= P99_FACTOR * p99_bound, (p99_admitted, p99_bound)


def caption_all(address: str, images: list[bytes], client_factory) -> tuple[list, float]:
    """Every image captioned at once, one thread (and channel) each, all released together; the answers
    (text, or the RpcError/SearchError) in image order, and the slowest call's seconds."""
    answers: list = [None] * len(images)
    seconds = [0.0] * len(images)
    start = threading.Barrier(len(images))

    def one(i: int):
        with client_factory(address) as client:
            start.wait()
            started = time.perf_counter()
            try:
                answers[i] = client.caption(images[i]).text
            except Exception as exc:  # noqa: BLE001 - kept and asserted on below
                answers[i] = exc
            seconds[i] = time.perf_counter() - started

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return answers, max(seconds)


def wait_for_metric(url: str, name: str, value: float, timeout: float = 30.0, **labels) -> float:
    end = time.monotonic() + timeout
    while (seen := metric(url, name, **labels)) != value and time.monotonic() < end:
        time.sleep(0.2)
    return seen


@pytest.fixture(scope="module")
def default_service(tmp_path_factory, triton, exported):
    """A service at its admission defaults (caption bounds from the decoder's capacity), shared by the
    designed-load tests."""
    from search_service.testing import ServiceProcess

    args = service_args(exported, "--metrics-port", "0")
    with ServiceProcess(tmp_path_factory.mktemp("default-admission"), triton.grpc_url, *args) as service:
        yield service


@pytest.mark.parametrize("concurrent", [16, 32])
def test_the_designed_caption_load_is_admitted_at_defaults(concurrent, live_triton, default_service, reference, figures):
    """16 (the decoder's designed batch) and 32 concurrent captions against the service at its defaults, by
    clients that never retry: every one answers, equal to the in-process caption. The caption bound is the
    decoder's capacity as Triton serves it (conftest's CAPACITY, not the template's 64). Old defaults: 8
    caption requests in flight, the 9th refused at once."""
    from search_service.testing import WireClient

    from .conftest import CAPACITY

    seen = wait_for_metric(default_service.metrics_url, "coca_search_inflight_limit", CAPACITY, **{"class": "caption"})
    assert seen == CAPACITY and metric(default_service.metrics_url, "coca_search_inflight_limit",
                                       **{"class": "caption_sequences"}) == CAPACITY
    images = unique_jpegs(9300 + concurrent, concurrent)
    answers, slowest = caption_all(default_service.address, images, WireClient)
    expected = [c.text for c in reference.caption(images)]
    assert answers == expected, [a for a in answers if not isinstance(a, str)][:3]
    figures.record("designed load at the admission defaults", **{
        f"captions_answered_of_{concurrent}": sum(isinstance(a, str) for a in answers),
        f"slowest_of_{concurrent}_s": round(slowest, 2), "caption_bound": int(seen)})


def test_shed_captions_are_retried_by_the_client_on_the_servers_hint(tmp_path, live_triton, exported, reference,
                                                                     figures):
    """A small caption bound refusing at once (--max-queue-wait 0): the service sheds (its metrics count it),
    and coca_client's captions, retried on the retry-after-ms hint, all answer with the in-process caption.
    (Old client: ResourceExhausted raised at the first refusal.)"""
    from clients.coca_client import Client, RetryPolicy
    from search_service.testing import ServiceProcess

    args = service_args(exported, "--max-inflight-caption", "2", "--max-queue-wait", "0", "--metrics-port", "0")
    images = unique_jpegs(9400, 12)
    with ServiceProcess(tmp_path / "data", live_triton.grpc_url, *args) as service:
        answers, slowest = caption_all(service.address, images,
                                       lambda address: Client(address, timeout=120, retry=RetryPolicy(attempts=50)))
        shed = metric(service.metrics_url, "coca_search_shed_total", bound="caption")
    assert answers == [c.text for c in reference.caption(images)], [a for a in answers if not isinstance(a, str)][:3]
    assert shed > 0
    figures.record("client retries on the hint", captions=len(images), shed_then_retried=int(shed),
                   slowest_s=round(slowest, 2))
