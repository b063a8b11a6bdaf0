"""Security: loopback by default, the bearer token guards every method, no untrusted deserialisation.

Covered elsewhere, not repeated here (tests/test_search_service.py):
- TLS with a test certificate, a wrong or missing token -> UNAUTHENTICATED, plaintext against TLS refused,
  a message over --max-message-mb -> RESOURCE_EXHAUSTED: test_token_tls_and_message_limit;
- AddImages by path refusing `..`, symlinks out of the roots and absolute paths elsewhere:
  test_bad_items_fail_alone (and generated paths in tests/reliability/test_fuzz.py);
- the decompression-bomb guard: test_bad_items_fail_alone, test_bad_requests_get_the_right_status.
"""
from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest

from .conftest import needs_triton, service_args

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["coca", "serving", "search_service", "clients"]


def listening_addresses(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on `port`, from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                if len(address) == 32 and address.startswith("0000000000000000FFFF0000"):
                    address = address[24:]  # ::ffff:a.b.c.d, an IPv4 address on a dual-stack socket
                if len(address) == 8:
                    found.append(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    found.append("ipv6:" + address)
    return found


@needs_triton
def test_the_service_binds_loopback_by_default(shared_service, figures):
    from search_service.config import ServiceConfig
    from search_service.server import parse_args

    assert parse_args(["--data", "x"]).host == "127.0.0.1" and ServiceConfig(data_dir="x").host == "127.0.0.1"
    port = int(shared_service.address.rsplit(":", 1)[1])
    addresses = listening_addresses(port)
    assert addresses and set(addresses) == {"127.0.0.1"}, addresses
    figures.record("security", default_bind=",".join(sorted(set(addresses))))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            yield node, owner, name, keywords


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_untrusted_deserialisation_in_the_code(figures):
    """No pickle.load(s)/Unpickler, no torch.load without weights_only=True, no np.load with allow_pickle=True,
    no yaml.load without a safe loader, no marshal/shelve/dill/joblib loading, anywhere under the packages."""
    offences, files = [], 0
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            files += 1
            tree = ast.parse(path.read_text(), str(path))
            for node, owner, name, kw in _calls(tree):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if owner in ("pickle", "cPickle", "dill", "marshal", "shelve", "joblib") and name in (
                        "load", "loads", "Unpickler", "open"):
                    offences.append(f"{where}: {owner}.{name}")
                elif name == "Unpickler":
                    offences.append(f"{where}: Unpickler")
                elif owner == "torch" and name == "load" and not _is_true(kw.get("weights_only")):
                    offences.append(f"{where}: torch.load without weights_only=True")
                elif owner in ("np", "numpy") and name == "load" and "allow_pickle" in kw and not (
                        isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
                    offences.append(f"{where}: np.load(allow_pickle=...)")
                elif owner == "yaml" and name in ("load", "unsafe_load", "full_load") and "Safe" not in ast.unparse(
                        kw.get("Loader", ast.Constant(""))):
                    offences.append(f"{where}: yaml.{name} without SafeLoader")
    assert offences == [], offences
    figures.record("security", files_scanned_for_unpickling=files, unsafe_loads=0)


@needs_triton
@pytest.mark.long
def test_the_token_guards_every_method(tmp_path, live_triton, exported, figures):
    """With a token (plaintext on loopback here; TLS + token is test_token_tls_and_message_limit), every method
    of the service answers UNAUTHENTICATED without it; health checks stay open for probes."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from search_service.pb import search_pb2 as pb
    from search_service.testing import ServiceProcess

    token = tmp_path / "token"
    token.write_text("t0ken\n")
    service = pb.DESCRIPTOR.services_by_name["SearchService"]
    with ServiceProcess(tmp_path / "data", live_triton.grpc_url, "--token-file", str(token),
                        *service_args(exported)) as process, grpc.insecure_channel(process.address) as channel:
        refused = 0
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            request = pb.__dict__[method.input_type.name]().SerializeToString()
            for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", "t0ken")]):
                if method.client_streaming:
                    call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
                    with pytest.raises(grpc.RpcError) as info:
                        list(call(iter([request]), metadata=metadata, timeout=30))
                elif method.server_streaming:  # CaptionStream
                    call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
                    with pytest.raises(grpc.RpcError) as info:
                        list(call(request, metadata=metadata, timeout=30))
                else:
                    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
                    with pytest.raises(grpc.RpcError) as info:
                        call(request, metadata=metadata, timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method.name, metadata, info.value)
                assert "bearer token" in info.value.details()
                refused += 1
        ok = channel.unary_unary(f"/{service.full_name}/Stats", request_serializer=None, response_deserializer=None)(
            pb.StatsRequest().SerializeToString(), metadata=[("authorization", "Bearer t0ken")], timeout=30)
        assert pb.StatsResponse.FromString(ok).embedding_dim >= 0
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    figures.record("security", token_refusals=refused, methods_guarded=len(service.methods))


def test_the_token_guards_the_streaming_methods_without_triton(tmp_path):
    """The streaming methods (AddImages, CaptionStream) refused for the token answer UNAUTHENTICATED, as unary
    ones do. Before, with a token configured, the metrics interceptor iterated the refusal (a coroutine, not an
    async generator): UNKNOWN "'async for' requires an object with __aiter__ method". No Triton needed: the
    token is checked before anything else (here Triton's address answers nothing)."""
    from search_service.pb import search_pb2 as pb
    from search_service.testing import ServiceProcess, WireClient

    token = tmp_path / "token"
    token.write_text("t0ken\n")
    with ServiceProcess(tmp_path / "data", "127.0.0.1:1", "--token-file", str(token)) as process, \
            WireClient(process.address, token="wrong", timeout=30) as client:
        for call in (lambda: list(client.add_images(iter([pb.AddImageRequest(image=b"x")]))),
                     lambda: list(client.stub.CaptionStream(pb.CaptionRequest(image=b"x"), metadata=client.metadata,
                                                            timeout=30))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in info.value.details()
