# The coca-search gRPC service (search_service) as an image: one replica of a scaled-out deployment
# (docker-compose.yml, profile "scale": Milvus holds the items, a shared volume the image bytes,
# Triton replicas the model, Envoy spreads clients over the replicas).
# torch comes from PyTorch's CPU index: the service holds no weights. Not built on the development
# machine (it has no Docker engine): `docker compose --profile scale config` validates the wiring.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/coca-search
COPY pyproject.toml ./
COPY coca ./coca
COPY serving ./serving
COPY clients ./clients
COPY bench ./bench
COPY search_service ./search_service
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
 && useradd --system --uid 10001 coca && mkdir -p /blobs && chown coca /blobs
USER coca
EXPOSE 50051
# Inside the compose network the service must listen beyond loopback; only Envoy publishes a port,
# and on the host's 127.0.0.1 alone.
CMD ["python", "-m", "search_service.server", "--host", "0.0.0.0", "--port", "50051", "--data", "/blobs"]
