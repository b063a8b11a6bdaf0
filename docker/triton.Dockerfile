# NVIDIA's Triton Inference Server (NGC) serving coca-search's model repository (Python backend).
#
# The NGC image's Python is 3.10 and so is its Python-backend stub; coca-search needs 3.11.
# So this image adds Ubuntu's python3.11, a venv holding this project (torch from PyPI: the
# CUDA build), and swaps in the 3.11 stub that the nvidia-pytriton wheel (a dependency)
# ships for the same Triton release (PyTriton 0.7.0 bundles Triton 2.51 = NGC 24.10).
# The stub finds the venv through PATH (<venv>/bin first), as serving/launcher.py does here.
# Not built on the development machine (it has no Docker engine): see README.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/coca
ENV PATH=/opt/coca/bin:$PATH
WORKDIR /opt/coca-search
COPY pyproject.toml ./
COPY coca ./coca
COPY serving ./serving
COPY clients ./clients
COPY bench ./bench
COPY search_service ./search_service
RUN python3.11 -m venv /opt/coca \
 && /opt/coca/bin/pip install --no-cache-dir . \
 && cp /opt/coca/lib/python3.11/site-packages/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub \
       /opt/tritonserver/backends/python/triton_python_backend_stub

# Idle OpenMP threads wait passively instead of spinning on cores other processes need.
ENV OMP_WAIT_POLICY=PASSIVE
EXPOSE 8000 8001 8002
# The repository (configs, model.py, weights) is mounted at /models: `coca export --out model_repository`.
CMD ["tritonserver", "--model-repository=/models", "--strict-readiness=true", "--exit-timeout-secs=10"]
