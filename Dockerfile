# attnlab in a container: the `attnlab` command, with data/ and runs/ in volumes.
#   docker build -t attnlab:cpu .                                     # CPU wheel of torch (the Makefile's pin)
#   docker build --build-arg TORCH_VARIANT=cu128 -t attnlab:cuda .    # CUDA wheel (needs --gpus all to run)
#   docker run --rm -v "$PWD/data:/data" -v "$PWD/runs:/runs" attnlab:cpu train configs/quickstart.yaml name=demo
FROM python:3.11-slim-bookworm

# Which PyTorch wheel index to install from: cpu, or a CUDA tag such as cu126 / cu128.
ARG TORCH_VARIANT=cpu
# Same release as the Makefile's CPU pin (TORCH_SPEC=torch==2.13.0), so the image trains the numbers the tests expect.
ARG TORCH_VERSION=2.13.0
# Optional extras of the attnlab package (data: Hugging Face datasets, parquet, scikit-learn).
ARG EXTRAS=data

# Downloads and the Hugging Face cache live in the /data volume, so they survive the container.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ATTNLAB_CACHE=/data/.cache/attnlab \
    HF_HOME=/data/.cache/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib

# torch alone first, from its own index (PyPI's default Linux torch is the multi-GB CUDA build):
# this slow layer is rebuilt only when the variant or the pin changes.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
# The torch installed above satisfies attnlab's torch>=2.6, so pip keeps it. DL3013 (pin versions)
# does not apply to a local project: its dependencies' ranges are in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[${EXTRAS}]" && rm -rf build src
COPY configs ./configs

# Relative paths resolve from /app: data/ and runs/ (the defaults) are the volumes, and presets'
# ../shared/data/... is /shared/data (mount your shared data there, read-only).
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin attnlab \
    && mkdir -p /data /runs \
    && chown attnlab:attnlab /data /runs \
    && ln -s /data /app/data \
    && ln -s /runs /app/runs
USER 1000:1000
VOLUME ["/data", "/runs"]

ENTRYPOINT ["attnlab"]
CMD ["--help"]
