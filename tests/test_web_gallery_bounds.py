"""The web gallery off loopback needs its own key; numbers it is sent are parsed in one place (400 naming the
parameter, never a 500). The gallery here has no service behind it (127.0.0.1:1): its checks come before
any call, and a request that gets past them ends UNAVAILABLE (503)."""
from __future__ import annotations

import http.client
import json
import socket

import pytest

from clients.coca_client import Client

KEY = "k3y-of-the-gallery-0123456789"


@pytest.fixture
def unreachable_service():
    with Client("127.0.0.1:1", timeout=5) as client:
        yield client


def request(port: int, method: str, path: str, headers: dict, body: bytes = b"") -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        raw = response.read()
        return response.status, dict(response.getheaders()), (json.loads(raw) if raw.startswith(b"{") else {})
    finally:
        connection.close()


def test_off_loopback_the_gallery_refuses_to_start_without_its_own_key(unreachable_service):
    from clients.web.server import start_gallery

    for host in ("0.0.0.0", "::" if socket.has_ipv6 else "0.0.0.0"):
        with pytest.raises(ValueError, match="needs an access key"):
            start_gallery(0, unreachable_service, host=host).stop()


def test_off_loopback_every_request_carries_the_key(unreachable_service):
    """A remote client sending `Host: localhost` passes the DNS-rebinding guard (it is no browser): without
    the key it gets 401 and the gallery calls nothing with the service's token."""
    from clients.web.server import start_gallery

    gallery = start_gallery(0, unreachable_service, host="0.0.0.0", access_key=KEY)
    port = gallery.server_address[1]
    host = {"Host": f"localhost:{port}"}
    try:
        for method, path in [("GET", "/api/stats"), ("GET", "/api/search?q=cat"), ("GET", "/thumb/abc"),
                             ("POST", "/api/caption?id=x"), ("GET", "/")]:
            status, _, body = request(port, method, path, {**host, "Content-Length": "0"})
            assert status == 401 and "access key" in body.get("error", ""), (method, path, status, body)
            status, _, _ = request(port, method, path, {**host, "Content-Length": "0",
                                                        "Authorization": "Bearer not-the-key-0123456789"})
            assert status == 401, (method, path)
        # The key: as a bearer token, or once as ?key= (a cookie for the browser afterwards).
        status, _, body = request(port, "GET", "/api/stats", {**host, "Authorization": f"Bearer {KEY}"})
        assert status == 503 and body["code"] == "UNAVAILABLE"  # past the gate: the service call was made
        status, headers, _ = request(port, "GET", "/?key=" + KEY + "&q=cat", host)
        assert status == 303 and headers["Location"] == "/?q=cat"
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        assert request(port, "GET", "/", {**host, "Cookie": cookie})[0] == 200
        assert request(port, "GET", "/api/stats", {**host, "Cookie": cookie})[0] == 503
        assert request(port, "GET", "/?key=wrong-key-0123456789", host)[0] == 401
    finally:
        gallery.stop()


@pytest.mark.parametrize("path, headers, name", [
    ("/api/search?q=cat&k=%C2%B2", {}, "k"),                     # "²": isdigit() but not int()
    ("/api/list?page_size=%C2%B2", {}, "page_size"),
    ("/api/list?page_size=%EF%BC%91", {}, "page_size"),           # a fullwidth "１"
    ("/thumb/abc?size=%C2%B2", {}, "size"),
    ("/api/duplicates?threshold=nan", {}, "threshold"),
    ("/api/duplicates?threshold=%EF%BC%91", {}, "threshold"),
    ("/api/search?q=cat&keyword_weight=inf", {}, "keyword_weight"),
    ("/api/search?q=cat&k=1e3", {}, "k"),
])
def test_bad_numbers_are_a_400_naming_the_parameter(unreachable_service, path, headers, name):
    from clients.web.server import start_gallery

    gallery = start_gallery(0, unreachable_service)
    try:
        port = gallery.server_address[1]
        status, _, body = request(port, "GET", path, {"Host": f"127.0.0.1:{port}", **headers})
        assert status == 400 and body["error"].startswith(f"{name} must be"), (status, body)
    finally:
        gallery.stop()


def test_a_bad_content_length_is_a_400_naming_it(unreachable_service):
    from clients.web.server import start_gallery

    gallery = start_gallery(0, unreachable_service)
    try:
        port = gallery.server_address[1]
        for length in ("²", "-5", "12abc"):
            status, _, body = request(port, "POST", "/api/search-image", {"Host": f"127.0.0.1:{port}",
                                                                          "Content-Length": length})
            assert status == 400 and body["error"].startswith("Content-Length must"), (length, status, body)
    finally:
        gallery.stop()
