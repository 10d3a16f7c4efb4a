# One image for producer, workers and Flower; the command picks the role.
#   GPU hosts: the default build (PyPI's torch 2.13.0 wheels for Linux bundle CUDA).
#   CPU-only hosts: --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> for a small image.
FROM python:3.11-slim
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HOME=/models
WORKDIR /app
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"; \
    else pip install torch==2.13.0; fi
COPY pyproject.toml README.md ./
COPY shared shared
COPY producer producer
COPY workers workers
RUN pip install ".[flower]"
RUN useradd --create-home --uid 1000 fleet && mkdir -p /models /data && chown fleet /models /data
USER fleet
# SIGTERM (the default) is the graceful stop: a worker finishes its unit within
# EMBED_FLEET_STOP_TIMEOUT or hands it back to its queue. Give it a grace period above that.
STOPSIGNAL SIGTERM
CMD ["celery", "-A", "workers.app", "worker", "-Q", "dense,rerank", "-c", "1", "--loglevel", "INFO"]
