"""`coca plot --index`: the feature space of the indexed images, fetched from a running search service.

The API has no "list every item" call, so the items come from a search: all of them when the index holds
at most --limit (a Flat search with k >= count returns everything), else the --limit nearest to --query.
Each item's stored embedding and image come from Get (include_embedding, include_image): no model is
loaded here.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

from coca.errors import InvalidInputError

MAX_K = 1000  # the service's default max_k


def fetch_points(client, query: str, limit: int, filters: Optional[dict] = None):
    """(embeddings (N, D), PIL thumbnails, hits, total): the items to plot."""
    import numpy as np
    from PIL import Image

    total = client.stats().count
    hits = client.search_text(query, k=min(limit, MAX_K), filters=filters).hits
    vectors, thumbs = [], []
    for hit in hits:
        item = client.get(hit.id, include_image=True, include_embedding=True)
        vectors.append(item.embedding)
        try:
            image = Image.open(io.BytesIO(item.image))
            image.draft("RGB", (128, 128))
            thumbs.append(image.convert("RGB"))
        except Exception:  # the stored file went away: a grey square marks it
            thumbs.append(Image.new("RGB", (64, 64), (200, 200, 200)))
    return (np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)), thumbs, hits, total


def plot_index(args) -> int:
    from clients.search_cli import connect, parse_pairs
    from clients.coca_client import SearchError
    from coca import plots

    if args.limit < 2:
        raise InvalidInputError("--limit must be at least 2")
    filters = parse_pairs(args.filter, "--filter")
    try:
        with connect(args) as client:
            points, thumbs, hits, total = fetch_points(client, args.query, args.limit, filters)
    except SearchError as exc:
        print(f"coca plot: error: {exc}")
        return 1
    if len(hits) < 2:
        raise InvalidInputError(f"the index has {len(hits)} matching image(s): need at least two to plot")
    scope = "all" if len(hits) >= total and not filters else f"the {len(hits)} nearest to {args.query!r} of"
    print(f"plotting {scope} {total} indexed images ({args.method})")
    print(f"wrote {plots.feature_space_png(points, thumbs, Path(args.out), method=args.method)}")
    return 0


def configure(p) -> None:
    """The options `coca plot --index` adds (connection options come from search_cli)."""
    from clients.search_cli import add_connection_options

    p.add_argument("--index", action="store_true",
                   help="plot the images indexed by a running search service (--server) instead of a folder")
    p.add_argument("--query", default="a photo", help="with --index: which items when there are more than --limit")
    p.add_argument("--limit", type=int, default=500, help="with --index: at most this many items (max 1000)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE", help="with --index: metadata must match")
    add_connection_options(p)
