"""The web gallery: a small HTTP server (stdlib, threads) in front of the search service.

    coca serve --web 8080                          # with the service it belongs to
    python -m clients.web --server 127.0.0.1:50051 --port 8080   # against a running service

It serves one page (static/: plain HTML, CSS and JS, no build step) and a small JSON API that talks to
the gRPC service through clients.coca_client:

    GET  /api/stats                              store size, model, index
    GET  /api/list?page_size=24&page_token=T     browse the collection a page at a time (List)
    GET  /api/search?q=TEXT&k=12&mode=hybrid     text -> image search (POST too; POST only with captions=1);
                                                 mode vector|keyword|hybrid (keyword_weight=0..1), page_token=T
    GET  /api/duplicates?threshold=0.95          groups of near-identical images (FindDuplicates), page_token=T
    POST /api/search-image?k=12&captions=0       body: the image bytes (image -> image search)
    GET  /api/similar?id=ID&k=12                 images like an indexed one (POST too; POST only with captions=1)
    POST /api/caption                            body: image bytes; or POST /api/caption?id=ID (empty body)
    GET  /thumb/ID?size=256                      JPEG thumbnail of an indexed image (a scene: its keyframe)
    GET  /api/video?id=VIDEO                     a video's scenes (times, captions, keyframe thumbnails)
    GET  /video/VIDEO                            the video's bytes, for <video>: HTTP range requests (206), at most
                                                 MAX_RANGE_BYTES an answer; read through the service by id (ReadVideo)

List and the searches also take conditions, `where=FIELD>=V` (repeatable, `coca search --where`'s forms, at
most MAX_CONDITIONS), and `order_by=-added_at` (a date/number field; "-": descending).

Thumbnails come from the service (Get with include_image): the web server never opens a file by a
name it was given, so it can show indexed images only, and only through the service's own rules (its
content-addressed blobs, or files under its --root folders). It binds 127.0.0.1 unless told otherwise.

Off loopback (bound to another address, e.g. 0.0.0.0 to serve a LAN) it refuses to start without an access
key of its own (`--access-key-file`, or COCA_WEB_ACCESS_KEY): the Host check below stops browsers made to
attack it, not a remote client that simply sends `Host: localhost`, and the gallery calls the service with
the service's token. With a key, every request carries it: `Authorization: Bearer KEY`, or the cookie set
by opening http://HOST:PORT/?key=KEY once (HttpOnly, SameSite=Strict); others get 401.

It holds the service's token, so it answers its own pages only: a Host header that does not name it
(127.0.0.1 / localhost / [::1] or the bound host, at its port) gets 421, which defeats DNS rebinding;
a request another site's page makes (an Origin other than its own, or Sec-Fetch-Site other than
same-origin) gets 403, except a plain navigation to its pages; and what writes to the store (a search
with captions: they are stored) is POST only, so a cross-site link or image cannot trigger it (405).
"""
from __future__ import annotations

import collections
import contextlib
import hmac
import http.cookies
import io
import ipaddress
import json
import logging
import re
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, Sequence

import grpc

from clients.coca_client import (Client, Condition, DeadlineExceeded, InvalidArgument, NotFound, PermissionDenied,
                                 ResourceExhausted, SearchError, Unauthenticated, Unavailable)

log = logging.getLogger("coca.web")

STATIC = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
MAX_UPLOAD_BYTES = 32 << 20  # the service's default image limit
MAX_K = 100  # hits, items or groups a page
MAX_CONDITIONS = 16
MAX_GROUP_CARDS = 24  # members of a near-duplicate group shown (each one a Get); the group's size is said
MAX_CONDITION_CHARS = 512
MODES = ("vector", "keyword", "hybrid")
MULTI_VALUED = ("where",)  # query parameters that may repeat (the others: the last one counts)
THUMB_SIZES = (128, 256, 512)
THUMB_CACHE = 512  # thumbnails kept in memory
MAX_RANGE_BYTES = 4 << 20  # bytes of a video one answer carries at most (a longer range is cut: the player asks on)
_RANGE = re.compile(r"bytes=([0-9]{0,15})-([0-9]{0,15})")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
KEY_COOKIE = "coca_gallery_key"  # the access key off loopback, once given as ?key=
MIN_ACCESS_KEY_CHARS = 16
WILDCARD_BINDS = ("0.0.0.0", "::", "")  # all interfaces: name the host clients use with allowed_hosts
CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; object-src 'none'"

_STATUS_BY_ERROR = [(InvalidArgument, HTTPStatus.BAD_REQUEST), (NotFound, HTTPStatus.NOT_FOUND),
                    (PermissionDenied, HTTPStatus.FORBIDDEN), (ResourceExhausted, HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
                    (Unavailable, HTTPStatus.SERVICE_UNAVAILABLE), (DeadlineExceeded, HTTPStatus.GATEWAY_TIMEOUT),
                    (Unauthenticated, HTTPStatus.BAD_GATEWAY)]


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str, code: str = "", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.code = status, code or status.phrase.upper().replace(" ", "_")
        self.headers = headers or {}


class Thumbnails:
    """JPEG thumbnails of indexed images, made from the service's bytes, kept in a small LRU."""

    def __init__(self, client: Client, capacity: int = THUMB_CACHE):
        self.client = client
        self.capacity = capacity
        self._cache: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, item_id: str, size: int) -> bytes:
        key = (item_id, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        jpeg = make_thumbnail(self.client.get(item_id, include_image=True, timeout=30).image, size)
        with self._lock:
            self._cache[key] = jpeg
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return jpeg


def make_thumbnail(data: bytes, size: int) -> bytes:
    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.split()[-1])
        image = background
    image = image.convert("RGB")
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def item_json(item) -> dict:
    """What a card shows of an item (an Item of List, or a Hit); a video scene's also says where it is."""
    added_at = getattr(item, "added_at", None) or getattr(item, "created_at", 0.0)
    scene = getattr(item, "scene", None) or (item if getattr(item, "video_id", "") else None)
    return {"id": item.id, "caption": item.caption, "name": _display_name(item.uri, item.id), "uri": item.uri,
            "metadata": item.metadata, "added_at": added_at, "thumb": _thumb_url(item.id),
            "scene": scene and scene_json(scene)}


def scene_json(scene) -> dict:
    """A scene's place in its video, and the URL that plays it from its start to its end (media fragment)."""
    return {"video_id": scene.video_id, "start_s": scene.start_s, "end_s": scene.end_s,
            "src": f"/video/{urllib.parse.quote(scene.video_id, safe='')}#t={scene.start_s:.3f},{scene.end_s:.3f}"}


def _thumb_url(item_id: str) -> str:
    return f"/thumb/{urllib.parse.quote(item_id, safe='')}"


def hit_json(hit) -> dict:
    """A hit's card, with its score and, in keyword/hybrid search, its rank in each list (0: not in it)."""
    return {**item_json(hit), "score": round(hit.score, 4), "caption_error": hit.caption_error,
            "vector_rank": hit.vector_rank, "keyword_rank": hit.keyword_rank}


def search_json(query: str, result) -> dict:
    return {"query": query, "hits": [hit_json(h) for h in result.hits], "searched": result.searched,
            "next_page_token": result.next_page_token}


def _display_name(uri: str, item_id: str) -> str:
    if not uri:
        return item_id[:12]
    return urllib.parse.unquote(uri.rstrip("/").rsplit("/", 1)[-1]) or uri


class GalleryServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], client: Client, title: str = "coca search",
                 allowed_hosts: Sequence[str] = (), access_key: Optional[str] = None):
        if not access_key and not is_loopback(address[0]):
            raise ValueError(f"the web gallery on {address[0] or 'all interfaces'} (off loopback) needs an access key "
                             "of its own (--access-key-file or COCA_WEB_ACCESS_KEY): anyone who reaches it would "
                             "search, caption and read images with the service's token")
        if access_key is not None and len(access_key) < MIN_ACCESS_KEY_CHARS:
            raise ValueError(f"the gallery's access key must have at least {MIN_ACCESS_KEY_CHARS} characters")
        self.access_key = access_key
        super().__init__(address, GalleryHandler)
        self.client = client
        self.thumbnails = Thumbnails(client)
        self.title = title
        self.host_headers = host_headers(address[0], self.server_address[1], allowed_hosts)
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> "GalleryServer":
        """Serve in a daemon thread; returns at once."""
        self._thread = threading.Thread(target=self.serve_forever, name="coca-web", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(10)
            self._thread = None
        self.server_close()


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to, it is not known to be loopback only


def host_headers(bound: str, port: int, extra: Sequence[str] = ()) -> frozenset[str]:
    """The Host header values that name this server: loopback names, the bound host and `extra` names,
    each with its port (and bare on port 80, where browsers leave the port out)."""
    names = {*LOOPBACK_NAMES, *extra}
    if bound not in WILDCARD_BINDS:
        names.add(f"[{bound}]" if ":" in bound else bound)
    names = {n.lower() for n in names}
    return frozenset({f"{n}:{port}" for n in names} | (names if port == 80 else set()))


class GalleryHandler(BaseHTTPRequestHandler):
    server: GalleryServer
    protocol_version = "HTTP/1.1"
    server_version = "coca-web/1"
    _body_read = False  # whether this request's body was read (else an error closes the connection)

    # ------------------------------------------------------------ routing
    def do_GET(self):
        self._dispatch({"/api/stats": self.api_stats, "/api/search": self.api_search,
                        "/api/similar": self.api_similar, "/api/list": self.api_list,
                        "/api/duplicates": self.api_duplicates, "/api/video": self.api_video})

    def do_POST(self):
        self._dispatch({"/api/search": self.api_search, "/api/similar": self.api_similar,
                        "/api/search-image": self.api_search_image, "/api/caption": self.api_caption})

    def _dispatch(self, routes: dict) -> None:
        started = time.monotonic()
        url = urllib.parse.urlsplit(self.path)
        query = {k: v if k in MULTI_VALUED else v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        self._body_read = False
        try:
            if self._admitted_by_key(url, query):
                return
            self._check_origin(url.path)
            if self.command == "GET" and url.path in ("/api/search", "/api/similar") and _flag(query, "captions"):
                raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED,
                                "a search with captions stores the captions: send it as POST", "METHOD_NOT_ALLOWED")
            if url.path in routes:
                self._json(routes[url.path](query), started)
            elif self.command == "GET" and url.path.startswith("/thumb/"):
                self.thumbnail(urllib.parse.unquote(url.path[len("/thumb/"):]), query)
            elif self.command == "GET" and url.path.startswith("/video/"):
                self.video(urllib.parse.unquote(url.path[len("/video/"):]))
            elif self.command == "GET":
                self.static(url.path)
            else:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {url.path}")
        except HttpError as exc:
            self._error(exc.status, str(exc), exc.code, exc.headers)
        except SearchError as exc:
            status = next((s for cls, s in _STATUS_BY_ERROR if isinstance(exc, cls)), HTTPStatus.BAD_GATEWAY)
            self._error(status, exc.details or str(exc), exc.code.name)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a bug here: say so, keep serving
            log.exception("web request %s failed", self.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")

    def _admitted_by_key(self, url, query) -> bool:
        """With an access key: HttpError 401 unless the request carries it; True when this request was the
        `?key=KEY` link, answered here (cookie set, redirect to the same page without the key)."""
        key = self.server.access_key
        if key is None:
            return False
        if "key" in query and hmac.compare_digest(query["key"].encode(), key.encode()):
            self._check_origin(url.path)
            rest = urllib.parse.urlencode({k: v for k, v in query.items() if k != "key"}, doseq=True)
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Set-Cookie", f"{KEY_COOKIE}={key}; HttpOnly; SameSite=Strict; Path=/")
            self.send_header("Location", url.path + (f"?{rest}" if rest else ""))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        cookies = http.cookies.SimpleCookie()
        with contextlib.suppress(http.cookies.CookieError):
            cookies.load(self.headers.get("Cookie") or "")
        given = [self.headers.get("Authorization", "").removeprefix("Bearer ").strip()]
        given += [cookies[KEY_COOKIE].value] if KEY_COOKIE in cookies else []
        if not any(g and hmac.compare_digest(g.encode(), key.encode()) for g in given):
            raise HttpError(HTTPStatus.UNAUTHORIZED, "this gallery needs its access key: open "
                            f"http://HOST:{self.server.server_address[1]}/?key=KEY once, or send 'Authorization: "
                            "Bearer KEY'", "UNAUTHENTICATED")
        return False

    def _check_origin(self, path: str) -> None:
        """Only this server's own pages may use it (see the module docstring); HttpError otherwise."""
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in self.server.host_headers:
            self.close_connection = True
            raise HttpError(HTTPStatus.MISDIRECTED_REQUEST,
                            f"Host {host[:100]!r} does not name this gallery (use http://127.0.0.1:"
                            f"{self.server.server_address[1]}/): refused, as a DNS-rebinding guard")
        origin = self.headers.get("Origin")
        if origin is not None and origin.strip().lower() != f"http://{host}":
            raise HttpError(HTTPStatus.FORBIDDEN, f"cross-origin request from {origin[:100]!r} refused")
        site = self.headers.get("Sec-Fetch-Site")
        page = self.headers.get("Sec-Fetch-Mode") == "navigate" and self.command == "GET" \
            and not path.startswith(("/api/", "/thumb/", "/video/"))
        if site not in (None, "same-origin", "none") and not page:
            raise HttpError(HTTPStatus.FORBIDDEN, f"request made by another site ({site}) refused")

    # ------------------------------------------------------------ API
    def api_stats(self, query) -> dict:
        stats = self.server.client.stats(timeout=10)
        return {"count": stats.count, "indexed": stats.indexed, "model": stats.model,
                "pretrained": stats.pretrained, "index": stats.index_active or stats.index_type,
                "triton_ready": stats.triton_ready, "random_weights": stats.pretrained == "random",
                "title": self.server.title}

    def api_search(self, query) -> dict:
        text = query.get("q", "").strip()
        if not text:
            raise HttpError(HTTPStatus.BAD_REQUEST, "type something to search for", "INVALID_ARGUMENT")
        mode = query.get("mode", "vector")
        if mode not in MODES:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"mode must be one of {', '.join(MODES)}", "INVALID_ARGUMENT")
        weight = parse_number(query, "keyword_weight", float) if query.get("keyword_weight") else None
        result = self.server.client.search_text(text, k=_k(query), with_captions=_flag(query, "captions"), mode=mode,
                                                keyword_weight=weight, **_page_query(query))
        return search_json(text, result)

    def api_similar(self, query) -> dict:
        item_id = query.get("id", "")
        result = self.server.client.search_image(id=item_id, k=_k(query), with_captions=_flag(query, "captions"),
                                                 **_page_query(query))
        return search_json(f"like {item_id}", result)

    def api_search_image(self, query) -> dict:
        data = self._body(required=True)
        result = self.server.client.search_image(data, k=_k(query), with_captions=_flag(query, "captions"),
                                                 **_conditions(query))
        return search_json("uploaded image", result)

    def api_list(self, query) -> dict:
        page = self.server.client.list(page_size=_k(query, "page_size"), **_page_query(query))
        return {"items": [item_json(i) for i in page.items], "total": page.total,
                "next_page_token": page.next_page_token}

    def api_duplicates(self, query) -> dict:
        threshold = parse_number(query, "threshold", float) if query.get("threshold") else 0.95
        page = self.server.client.find_duplicates(threshold, page_size=_k(query, "page_size"),
                                                  page_token=query.get("page_token", ""))
        shown = [g.ids[:MAX_GROUP_CARDS] for g in page.groups]
        cards = {i: item_json(self.server.client.get(i)) for ids in shown for i in ids}
        return {"threshold": threshold, "total_groups": page.total_groups, "next_page_token": page.next_page_token,
                "groups": [{"size": len(g.ids), "items": [cards[i] for i in ids],
                            "pairs": [{"a": a, "b": b, "score": round(score, 4)} for a, b, score in g.pairs]}
                           for g, ids in zip(page.groups, shown)]}

    def api_caption(self, query) -> dict:
        item_id = query.get("id", "")
        data = self._body(required=not item_id)
        caption = (self.server.client.caption(id=item_id, timeout=300) if item_id and not data
                   else self.server.client.caption(data, timeout=300))
        return {"id": item_id, "caption": caption.text}

    def api_video(self, query) -> dict:
        video_id = query.get("id", "")
        item = self.server.client.get(video_id, timeout=30)
        if item.video is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"{video_id!r} is not a video", "NOT_FOUND")
        return {"id": item.id, "name": _display_name(item.uri, item.id), "duration_s": item.video.duration_s,
                "scenes": [{**scene_json(s), "id": s.id, "index": s.index, "caption": s.caption,
                            "thumb": _thumb_url(s.id)} for s in item.video.scenes]}

    def video(self, video_id: str) -> None:
        """The video's bytes, by its id only: a range (206, at most MAX_RANGE_BYTES of it), or all of it (200,
        streamed a slice at a time) without a Range header. 416 for a range past its end, 400 for one that
        does not parse (one `bytes=` range only)."""
        if not video_id or len(video_id) > 256:
            raise HttpError(HTTPStatus.NOT_FOUND, "no such video")
        wanted = self.headers.get("Range")
        first, last = parse_range(wanted) if wanted is not None else (0, None)
        read = self.server.client.read_video
        try:
            if first is None:  # bytes=-N: the last N bytes
                total = read(video_id, 0, 1, timeout=30).total_bytes
                first, last = max(0, total - last), total - 1
            if last is not None and last < first:  # also bytes=-0
                raise self._unsatisfiable(video_id, wanted)
            piece = read(video_id, first, MAX_RANGE_BYTES if last is None else min(MAX_RANGE_BYTES, last - first + 1),
                         timeout=30)
        except SearchError as exc:
            if exc.code != grpc.StatusCode.OUT_OF_RANGE:
                raise
            raise self._unsatisfiable(video_id, wanted) from None
        headers = {"Accept-Ranges": "bytes"}
        if wanted is None:
            self._send(HTTPStatus.OK, b"", piece.content_type, "private, max-age=3600", headers,
                       length=piece.total_bytes)
            self._stream_video(video_id, piece)
            return
        end = piece.offset + len(piece.data) - 1
        headers["Content-Range"] = f"bytes {piece.offset}-{end}/{piece.total_bytes}"
        self._send(HTTPStatus.PARTIAL_CONTENT, piece.data, piece.content_type, "private, max-age=3600", headers)

    def _unsatisfiable(self, video_id: str, wanted: str) -> HttpError:
        total = self.server.client.read_video(video_id, 0, 1, timeout=30).total_bytes
        return HttpError(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"range {wanted[:60]!r} is not within the "
                         f"video ({total} bytes)", headers={"Content-Range": f"bytes */{total}"})

    def _stream_video(self, video_id: str, piece) -> None:
        """The whole video after its headers, slice by slice (memory: one slice). A failure midway can only
        close the connection: the client sees a body shorter than its Content-Length."""
        keep, self.close_connection = self.close_connection, True
        while True:
            self.wfile.write(piece.data)
            offset = piece.offset + len(piece.data)
            if offset >= piece.total_bytes or not piece.data:
                self.close_connection = keep
                return
            try:
                piece = self.server.client.read_video(video_id, offset, MAX_RANGE_BYTES, timeout=30)
            except SearchError as exc:
                log.warning("video %r cut at byte %d: %s", video_id, offset, exc)
                return

    def thumbnail(self, item_id: str, query) -> None:
        size = parse_number(query, "size", default=256)
        size = min(THUMB_SIZES, key=lambda s: abs(s - size))
        if not item_id or len(item_id) > 256:
            raise HttpError(HTTPStatus.NOT_FOUND, "no such image")
        try:
            jpeg = self.server.thumbnails.get(item_id, size)
        except (NotFound, InvalidArgument):
            raise HttpError(HTTPStatus.NOT_FOUND, f"no indexed image {item_id!r}") from None
        except SearchError:
            raise
        except Exception as exc:  # the stored file is gone or unreadable
            raise HttpError(HTTPStatus.NOT_FOUND, f"image {item_id!r} cannot be shown: {exc}") from None
        self._send(HTTPStatus.OK, jpeg, "image/jpeg", cache="private, max-age=3600")

    def static(self, path: str) -> None:
        name = "index.html" if path in ("/", "/index.html") else path.lstrip("/").removeprefix("static/")
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # a fixed set: no path ever built from input
        if name not in files or files[name].suffix not in STATIC_TYPES:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        self._send(HTTPStatus.OK, files[name].read_bytes(), STATIC_TYPES[files[name].suffix], cache="no-cache")

    # ------------------------------------------------------------ plumbing
    def _body(self, required: bool) -> bytes:
        if self.headers.get("Content-Length") is None:
            if required:
                raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send the image as the request body, with a Content-Length")
            return b""
        size = parse_number({"Content-Length": self.headers["Content-Length"]}, "Content-Length")
        if size < 0:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"Content-Length must not be negative, got {size}", "INVALID_ARGUMENT")
        if size > MAX_UPLOAD_BYTES:
            self.close_connection = True
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image over {MAX_UPLOAD_BYTES >> 20} MB")
        data = self.rfile.read(size)
        self._body_read = True
        if required and not data:
            raise HttpError(HTTPStatus.BAD_REQUEST, "empty upload: choose an image first", "INVALID_ARGUMENT")
        return data

    def _json(self, payload: dict, started: float) -> None:
        payload["ms"] = round((time.monotonic() - started) * 1000, 1)
        self._send(HTTPStatus.OK, json.dumps(payload).encode(), "application/json")

    def _error(self, status: HTTPStatus, message: str, code: str = "", headers: Optional[dict] = None) -> None:
        body = json.dumps({"error": message, "code": code or status.phrase}).encode()
        headers = {"Allow": "POST"} if status == HTTPStatus.METHOD_NOT_ALLOWED else dict(headers or {})
        if self.headers.get("Content-Length", "0") != "0" and not self._body_read:
            self.close_connection = True  # its unread body would be taken for the next request
        try:
            self._send(status, body, "application/json", headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, cache: str = "no-store",
              headers: Optional[dict] = None, length: Optional[int] = None) -> None:
        """Answer with `body`; with `length`, only the headers (the caller writes `length` bytes after)."""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):  # quiet by default; COCA_LOG_LEVEL=INFO shows requests
        log.info("%s %s", self.address_string(), format % args)


_NUMBER_SYNTAX = {int: re.compile(r"[-+]?[0-9]{1,12}"), float: re.compile(r"[-+]?(?:[0-9]{1,12}(?:\.[0-9]{0,12})?|\.[0-9]{1,12})")}


def parse_number(query, name: str, kind: type = int, default=None):
    """query[name] (or `default` when absent) as an int or a finite float, written in ASCII decimal digits: the one
    parser of numbers a client sends. str.isdigit() accepts "²" that int() refuses, and float() accepts "nan",
    "inf" and "１": each is a 400 naming the parameter here, never a 500 or a NaN passed on."""
    raw = query.get(name)
    if raw is None and default is not None:
        return default
    raw = (raw or "").strip()
    if not _NUMBER_SYNTAX[kind].fullmatch(raw):
        what = "an integer" if kind is int else "a number"
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{name} must be {what} (decimal digits), got {raw[:40]!r}",
                        "INVALID_ARGUMENT")
    return kind(raw)


def parse_range(header: str) -> tuple[Optional[int], Optional[int]]:
    """(first, last) of a Range header `bytes=FIRST-LAST` (last None: to the end; first None: the last `last`
    bytes, `bytes=-N`). One range only; HttpError 400 naming the header otherwise."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise HttpError(HTTPStatus.BAD_REQUEST, "Range must be one range of bytes (bytes=FIRST-LAST, bytes=FIRST- "
                        f"or bytes=-N), got {header[:60]!r}", "INVALID_ARGUMENT")
    first, last = (int(g) if g else None for g in match.groups())
    return first, last


def _k(query, name: str = "k") -> int:
    return max(1, min(MAX_K, parse_number(query, name, default=12)))


def _conditions(query) -> dict:
    """The client's where/order_by keywords from `where` (repeatable) and `order_by`."""
    texts = query.get("where", [])
    if len(texts) > MAX_CONDITIONS or any(len(t) > MAX_CONDITION_CHARS for t in texts):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"at most {MAX_CONDITIONS} conditions of {MAX_CONDITION_CHARS} "
                        "characters each", "INVALID_ARGUMENT")
    try:
        where = [Condition.parse(t) for t in texts]
    except ValueError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"condition {exc}", "INVALID_ARGUMENT") from None
    return {"where": where, "order_by": query.get("order_by", "")}


def _page_query(query) -> dict:
    """_conditions and the page token: what pages of a listing or search are."""
    return {**_conditions(query), "page_token": query.get("page_token", "")}


def _flag(query, name: str) -> bool:
    return query.get(name, "0").lower() in ("1", "true", "yes", "on")


def start_gallery(port: int, client: Client, host: str = "127.0.0.1", title: str = "coca search",
                  allowed_hosts: Sequence[str] = (), access_key: Optional[str] = None) -> GalleryServer:
    """Start the gallery on host:port (0 = a free port) in a background thread. It answers requests
    whose Host names it: a loopback name, `host`, or one of `allowed_hosts` (e.g. the machine's
    name, when bound to 0.0.0.0), each at its port; with `access_key` (required off loopback: ValueError
    without), only those that carry the key."""
    return GalleryServer((host, port), client, title, allowed_hosts, access_key).start()
