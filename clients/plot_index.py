"""`coca plot --index`: the feature space of the indexed images, fetched from a running search service.

The items come from List (the first --limit items passing --filter, oldest first), or with --query from a
search (the --limit nearest to it). Embeddings come with the List pages (or from Get after a search), the
thumbnails from Get (include_image): no model is loaded here.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

from coca.errors import InvalidInputError

MAX_K = 1000  # the service's default max_k (and List's largest page)


def fetch_points(client, query: Optional[str], limit: int, filters: Optional[dict] = None):
    """(embeddings (N, D), PIL thumbnails, ids, total passing the filter): the items to plot."""
    import numpy as np

    if query:
        ids = [hit.id for hit in client.search_text(query, k=min(limit, MAX_K), filters=filters).hits]
        vectors = [client.get(i, include_embedding=True).embedding for i in ids]
        total = client.list(filters=filters, page_size=1).total
    else:
        items, token, total = [], "", 0
        while len(items) < limit:
            page = client.list(filters=filters, page_size=min(limit - len(items), MAX_K), page_token=token,
                               include_embeddings=True)
            items, token, total = items + page.items, page.next_page_token, page.total
            if not token:
                break
        ids, vectors = [i.id for i in items], [i.embedding for i in items]
    thumbs = [_thumbnail(client.get(i, include_image=True).image) for i in ids]
    return (np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)), thumbs, ids, total


def _thumbnail(data: bytes):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (128, 128))
        return image.convert("RGB")
    except Exception:  # the stored file went away: a grey square marks it
        return Image.new("RGB", (64, 64), (200, 200, 200))


def plot_index(args) -> int:
    from clients.search_cli import connect, parse_pairs
    from clients.coca_client import SearchError
    from coca import plots

    if args.limit < 2:
        raise InvalidInputError("--limit must be at least 2")
    filters = parse_pairs(args.filter, "--filter")
    try:
        with connect(args) as client:
            points, thumbs, ids, total = fetch_points(client, args.query, args.limit, filters)
    except SearchError as exc:
        print(f"coca plot: error: {exc}")
        return 1
    if len(ids) < 2:
        raise InvalidInputError(f"the index has {len(ids)} matching image(s): need at least two to plot")
    matching = "indexed images" if not filters else "matching images"
    if args.query:
        scope = f"the {len(ids)} nearest to {args.query!r} of"
    else:
        scope = "all" if len(ids) >= total else f"the first {len(ids)} of"
    print(f"plotting {scope} {total} {matching} ({args.method})")
    print(f"wrote {plots.feature_space_png(points, thumbs, Path(args.out), method=args.method)}")
    return 0


def configure(p) -> None:
    """The options `coca plot --index` adds (connection options come from search_cli)."""
    from clients.search_cli import add_connection_options

    p.add_argument("--index", action="store_true",
                   help="plot the images indexed by a running search service (--server) instead of a folder")
    p.add_argument("--query", help="with --index: the --limit items nearest to this text (default: the first "
                                   "--limit items, oldest first, through List)")
    p.add_argument("--limit", type=int, default=500, help="with --index: at most this many items")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE", help="with --index: metadata must match")
    add_connection_options(p)
