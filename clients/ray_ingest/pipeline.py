"""The driver: check the set-up, build the Ray Data pipeline, stream per-item outcomes back.

    plan = IngestPlan(sources=["photos/", "more.parquet"], service=ServiceTarget("127.0.0.1:50051"), tritons=["127.0.0.1:8001"])
    with ray_session(address=None):
        for outcome in ingest(plan):
            ...

Two ways to embed, one pipeline:
  * `tritons` given: the Embedder actors (one per endpoint) embed, the service stores the vectors it is
    handed (it must run with --accept-embeddings and its Triton must serve the same export);
  * no `tritons`: the service embeds each item through its own Triton, as for plain `coca index`.
Either way the service writes (validation, content-hash idempotency, durability stay its job), and
content it already holds is skipped (FindContent) before anything is embedded or sent.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

from coca.errors import CocaError
from coca.media import DEFAULT_MAX_PIXELS

from .stages import OUTPUT_COLUMNS, ServiceTarget

CPUS_PER_READ_TASK = 0.5  # reading and hashing; fractional so that a 2-CPU cluster runs several at once
CPUS_PER_ACTOR = 0.25  # embedders and writers wait on the network; an actor asking more than a node has never starts
MAX_BATCH = 1024  # one FindContent call per batch


class IngestError(CocaError):
    """The run cannot start as asked (the service refuses embeddings, Triton serves another export ...)."""


@dataclass
class IngestPlan:
    sources: list[str]  # one pipeline over all of them
    service: ServiceTarget
    tritons: list[str] = field(default_factory=list)  # empty: the service embeds
    metadata: dict[str, str] = field(default_factory=dict)  # for every item (manifest columns override)
    path_column: Optional[str] = None
    batch_size: int = 32
    writers: int = 1
    max_image_bytes: int = 32 << 20  # the service's default limit
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if not self.sources:
            raise IngestError("give at least one SOURCE")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise IngestError(f"--batch-size must be in [1, {MAX_BATCH}], got {self.batch_size}")
        if self.writers < 1:
            raise IngestError(f"--writers must be at least 1, got {self.writers}")


@dataclass(frozen=True)
class ItemOutcome:
    source: str
    outcome: str  # added, duplicate, failed
    id: str
    sha256: str
    code: str  # gRPC status name of a failure
    message: str
    skipped: bool  # the service held this content before the run looked: nothing embedded or sent


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, num_cpus: Optional[int] = None):
    """A Ray session for the run: the cluster at `address`, else a local one (shut down afterwards).
    A session already open in this process (a test's, a notebook's) is used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=address or None, num_cpus=None if address else (num_cpus or os.cpu_count()),
             include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def preflight(plan: IngestPlan):
    """(the checked Sources, the export Ray embeds with: "" when the service embeds) once the plan can run
    (InvalidInputError, IngestError say why not). Nothing here needs Ray: a set-up error costs no cluster start."""
    from clients.coca_client import SearchError

    from .sources import resolve

    sources = [resolve(source, plan.path_column) for source in plan.sources]
    try:
        with plan.service.connect() as client:
            stats = client.stats()
    except SearchError as exc:
        raise IngestError(f"search service at {plan.service.address}: {exc}") from None
    if not plan.tritons:
        return sources, ""
    if not stats.accepts_embeddings:
        raise IngestError(f"the search service at {plan.service.address} takes no precomputed embeddings: start it "
                          "with --accept-embeddings, or leave out --triton so that it embeds the images itself")
    if not stats.repository_id:
        raise IngestError(f"the search service at {plan.service.address} cannot reach its Triton "
                          "(it must say which export it serves)")
    _check_endpoints(plan.tritons, stats.repository_id)
    return sources, stats.repository_id


def _check_endpoints(endpoints: list[str], repository_id: str) -> None:
    """Every endpoint answers and serves the export the service's Triton serves."""
    import asyncio

    from serving.client import TritonCoca

    async def identity(url):
        async with TritonCoca(url, timeout_s=30) as triton:
            return await asyncio.wait_for(triton.identity(), 30)

    for url in endpoints:
        try:
            found = asyncio.run(identity(url))
        except (CocaError, asyncio.TimeoutError) as exc:  # unreachable, not a coca export
            raise IngestError(f"Triton at {url}: {exc}") from None
        if found.repository_id != repository_id:
            raise IngestError(f"Triton at {url} serves {found.model} ({found.pretrained}) export "
                              f"{found.repository_id[:16]}, the service's Triton export {repository_id[:16]}: "
                              "embeddings must come from the same weights")


def total(sources) -> Optional[int]:
    """Items in all the sources, when each knows its count without being read."""
    counts = [source.total for source in sources]
    return None if None in counts else sum(counts)


def build(plan: IngestPlan, sources, repository_id: str):
    """The pipeline: a Dataset of OUTPUT_COLUMNS rows (needs a Ray session)."""
    import ray
    import ray.data

    from .stages import EndpointClaims, Embedder, Writer, read_and_check

    ray.data.DataContext.get_current().enable_progress_bars = False  # the CLI draws one bar of its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no "Starting execution ..." lines between bar updates
    first, *others = [source.dataset(plan.metadata) for source in sources]
    dataset = (first.union(*others) if others else first).map_batches(
        read_and_check, batch_size=plan.batch_size, num_cpus=CPUS_PER_READ_TASK,
        fn_kwargs={"max_bytes": plan.max_image_bytes, "max_pixels": plan.max_pixels})
    if plan.tritons:
        claims = EndpointClaims.remote(plan.tritons)
        dataset = dataset.map_batches(
            Embedder, batch_size=plan.batch_size, num_cpus=CPUS_PER_ACTOR,
            compute=_actors(len(plan.tritons)),
            fn_constructor_kwargs={"claims": claims, "service": plan.service, "repository_id": repository_id})
    dataset = dataset.map_batches(
        Writer, batch_size=plan.batch_size, num_cpus=CPUS_PER_ACTOR,
        compute=_actors(plan.writers),
        fn_constructor_kwargs={"service": plan.service, "repository_id": repository_id, "lookup": not plan.tritons})
    return dataset


def _actors(size: int):
    """`size` actors, each working on BATCHES_AT_ONCE batches at once on threads of its own (one more queued),
    so that the model behind them has the next batch while one ends."""
    import ray.data

    from .stages import BATCHES_AT_ONCE

    return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=BATCHES_AT_ONCE + 1,
                                      max_concurrent_calls_per_actor=BATCHES_AT_ONCE, enable_true_multi_threading=True)


def outcomes(dataset) -> Iterator[ItemOutcome]:
    """Per-item outcomes as the pipeline produces them (in no particular order)."""
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for row in zip(*(batch[name] for name in OUTPUT_COLUMNS)):
            values = dict(zip(OUTPUT_COLUMNS, row))
            yield ItemOutcome(**{k: (bool(v) if k == "skipped" else str(v)) for k, v in values.items()})


def ingest(plan: IngestPlan) -> Iterator[ItemOutcome]:
    """Check the set-up, then run the pipeline in the current Ray session (see ray_session)."""
    yield from outcomes(build(plan, *preflight(plan)))
