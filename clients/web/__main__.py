"""python -m clients.web --server HOST:PORT [--port 8080]: the web gallery for a running search service."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.web", description=__doc__)
    p.add_argument("--server", default="127.0.0.1:50051", help="search service HOST:PORT (default %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (0: a free one; default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests for http://NAME:PORT/ (repeatable; loopback names and --host always)")
    p.add_argument("--token-file", help="bearer token file of the search service (or set COCA_SEARCH_TOKEN)")
    p.add_argument("--tls-ca", help="CA certificate (PEM) of a TLS search service")
    p.add_argument("--access-key-file", help="the gallery's own access key (at least 16 characters; or set "
                   "COCA_WEB_ACCESS_KEY): required when --host is not loopback")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("COCA_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")

    from clients.coca_client import Client
    from clients.web.server import start_gallery

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    access_key = (Path(args.access_key_file).read_text().strip() if args.access_key_file
                  else os.environ.get("COCA_WEB_ACCESS_KEY") or None)
    client = Client(args.server, token=token, tls_ca=args.tls_ca, timeout=300)
    try:
        gallery = start_gallery(args.port, client, args.host, allowed_hosts=args.allow_host, access_key=access_key)
    except ValueError as exc:
        print(f"python -m clients.web: error: {exc}", file=sys.stderr)
        client.close()
        return 2
    print(f"web gallery on {gallery.url} (search service {args.server})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    gallery.stop()
    client.close()
    print("web gallery stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
