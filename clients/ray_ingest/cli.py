"""`coca index SOURCE --ray [ADDRESS]`: options, progress bar, summary (registered by clients/search_cli.py)."""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

from coca.errors import InvalidInputError

DEFAULTS = {"triton": None, "writers": 1, "batch_size": 32, "path_column": None, "report": None}  # Ray-only options


def configure(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bulk ingest on Ray Data (--ray)")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray: the cluster at ADDRESS (HOST:PORT of its GCS, or 'auto'), else a local one "
                        "on this machine's CPUs. SOURCE may then also be a glob, a text file of paths/URIs, "
                        "or a Parquet/CSV manifest")
    g.add_argument("--triton", metavar="HOST:PORT[,HOST:PORT...]",
                   help="embed on these Triton endpoints (one actor each) and hand the service the vectors "
                        "(it must run with --accept-embeddings); default: the service embeds")
    g.add_argument("--writers", type=int, default=DEFAULTS["writers"],
                   help="AddImages streams in parallel (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="items per Ray batch, at most 1024 (default %(default)s)")
    g.add_argument("--path-column", help="a manifest's column of paths/URIs (default: path, else url)")
    g.add_argument("--report", metavar="FILE", help="also write one JSON line per item (outcome, id, reason)")


def check_plain(args) -> None:
    """The Ray options mean nothing to a plain run: say so instead of ignoring them."""
    given = [f"--{name.replace('_', '-')}" for name, default in DEFAULTS.items() if getattr(args, name) != default]
    if given:
        raise InvalidInputError(f"{', '.join(given)} only apply with --ray")


def plan_from_args(args, metadata: dict[str, str]):
    from .pipeline import IngestPlan
    from .stages import ServiceTarget

    token, tls_ca = _credentials(args)
    tritons = [t.strip() for t in (args.triton or "").split(",") if t.strip()]
    return IngestPlan(sources=args.sources, service=ServiceTarget(args.server, token, tls_ca, args.timeout),
                      tritons=tritons, metadata=metadata, path_column=args.path_column,
                      batch_size=args.batch_size, writers=args.writers)


def _credentials(args):
    import os

    token = os.environ.get("COCA_SEARCH_TOKEN") or None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    return token, Path(args.tls_ca).read_bytes() if args.tls_ca else None


def run(args, metadata: dict[str, str]) -> int:
    from .pipeline import build, outcomes, preflight, ray_session, total

    plan = plan_from_args(args, metadata)
    sources, repository_id = preflight(plan)  # before Ray starts: a set-up error costs nothing
    summary = Summary()
    report = open(args.report, "w", encoding="utf-8") if args.report else None
    try:
        with ray_session(args.ray), _bar(total(sources)) as bar:
            summary.start()
            for outcome in outcomes(build(plan, sources, repository_id)):
                summary.count(outcome)
                if outcome.outcome == "failed":
                    bar.write(failure_line(outcome), file=sys.stderr)
                if report:
                    report.write(json.dumps(outcome.__dict__) + "\n")
                bar.update(1)
                bar.set_postfix(summary.postfix(), refresh=False)
    except Exception as exc:  # Triton or the service went away mid-run; Ray wraps the cause
        print(summary.line(), file=sys.stderr)
        print(f"coca index: error: {_cause(exc)} (run it again to resume: indexed images are skipped by "
              f"content hash)", file=sys.stderr)
        return 1
    finally:
        if report:
            report.close()
    print(summary.line())
    return 1 if summary.counts["failed"] else 0


def failure_line(outcome) -> str:
    """SOURCE: CODE: why (the source named once, whether or not the message names it)."""
    message = outcome.message.removeprefix(f"{outcome.source}: ")
    return f"{outcome.source}: {outcome.code}: {message}"


def _bar(total):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="indexing (ray)", dynamic_ncols=True)


def _cause(exc: BaseException) -> str:
    """The last line of Ray's wrapped traceback: the original error."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class Summary:
    """Counts of added / duplicate / failed (by reason), skipped content, and the rate."""

    def __init__(self):
        self.counts = collections.Counter({"added": 0, "duplicate": 0, "failed": 0})
        self.reasons: collections.Counter = collections.Counter()
        self.skipped = 0
        self.started = time.perf_counter()

    def start(self) -> None:
        self.started = time.perf_counter()

    def count(self, outcome) -> None:
        self.counts[outcome.outcome] += 1
        self.skipped += outcome.skipped
        if outcome.outcome == "failed":
            self.reasons[outcome.code] += 1

    def postfix(self) -> dict:
        return dict(self.counts)

    def line(self) -> str:
        total = sum(self.counts.values())
        elapsed = time.perf_counter() - self.started
        reasons = ", ".join(f"{code} {n}" for code, n in self.reasons.most_common())
        return (f"{total} items: {self.counts['added']} added, {self.counts['duplicate']} already indexed "
                f"({self.skipped} skipped before embedding), {self.counts['failed']} failed"
                + (f" ({reasons})" if reasons else "") + f"; {elapsed:.1f} s, {total / max(elapsed, 1e-9):.1f} images/s")
