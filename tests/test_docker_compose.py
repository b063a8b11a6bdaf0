"""docker-compose.yml is a valid Compose file (no Docker engine here: `config` only) that binds 127.0.0.1."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) when the docker client has it, else Debian's `docker-compose` (v1)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(compose_command() is None, reason="neither `docker compose` nor `docker-compose` is installed")
@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"], ["--profile", "scale"]], ids=["cpu", "gpu", "scale"])
def test_compose_config_accepts_the_file(profile):
    result = subprocess.run([*compose_command(), *profile, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_published_ports_are_loopback_only():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    ports = [port for service in services.values() for port in service.get("ports", [])]
    assert ports and all(str(port).startswith("127.0.0.1:") for port in ports)
    assert (ROOT / services["triton"]["build"]["dockerfile"]).is_file()


def test_the_scale_profile_wires_milvus_two_tritons_two_replicas_and_envoy():
    """Profile "scale": two service replicas on one Milvus collection and one blob volume, each using both
    Triton replicas; Envoy balances gRPC over exactly those replicas and health-checks them."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    scale = {name for name, s in services.items() if "scale" in s.get("profiles", [])}
    assert {"etcd", "minio", "milvus", "triton-b", "search-a", "search-b", "envoy"} <= scale
    for name in ("search-a", "search-b"):
        command = services[name]["command"]
        flag = {command[i]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}
        assert flag["--vector-store"] == "milvus" and flag["--milvus-uri"] == "http://milvus:19530"
        assert set(flag["--triton"].split(",")) == {"triton:8001", "triton-b:8001"}
        assert services[name]["volumes"] == ["blobs:/blobs"] and flag["--data"] == "/blobs"
    envoy = yaml.safe_load((ROOT / "docker" / "envoy.yaml").read_text())
    [cluster] = envoy["static_resources"]["clusters"]
    endpoints = {e["endpoint"]["address"]["socket_address"]["address"]
                 for group in cluster["load_assignment"]["endpoints"] for e in group["lb_endpoints"]}
    assert endpoints == {"search-a", "search-b"} and cluster["health_checks"][0]["grpc_health_check"] == {}
    assert services["envoy"]["ports"] == ["127.0.0.1:50051:8080"]
    assert (ROOT / services["search-a"]["build"]["dockerfile"]).is_file()
