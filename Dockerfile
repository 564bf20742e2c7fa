# fedq in a container: every fedq command, with `fedq` as the entry point (`fedq serve ...`,
# `fedq join ...`; docker-compose.yml runs one server and two clients with it).
#
#   docker build -t fedq .
#
# fedq is installed as scripts/dev installs it: torch 2.13.0 first, from the CPU build, then fedq
# with the text and privacy extras against constraints.txt (no dev tools, no Triton kernels). Two
# stages: the virtual environment is made in the first and copied alone into the second, so no
# pip cache, source tree or build-time setting reaches the image.
#
# Build arguments:
#   BASE_IMAGE       a Debian-like image with Python 3.11 and its venv module (default
#                    python:3.11-slim); both stages use it, so the copied venv finds its Python.
#   TORCH_INDEX_URL  an extra index holding torch's CPU build (default: PyTorch's); empty: the
#                    other pip settings alone decide where torch comes from.
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST, PIP_NO_INDEX
#                    pip's own settings, for a mirror or a local wheelhouse (scripts/compose-smoke
#                    builds from one); they apply to the build stage only.
#   FEDQ_UID         uid of the unprivileged user `fedq` that runs fedq (default 10001). Mounted
#                    keys and tokens are mode 0600: they must belong to this uid.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_NO_INDEX
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/fedq
WORKDIR /src
COPY constraints.txt ./
# torch first, on its own, so that its CPU build is the one installed; the next step must keep it.
RUN /opt/fedq/bin/pip install -c constraints.txt \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY fedq ./fedq
COPY kernels ./kernels
RUN /opt/fedq/bin/pip install -c constraints.txt ".[text,privacy]" \
 && /opt/fedq/bin/python -c "import sys; from importlib.metadata import version as v; \
t = v('torch'); sys.exit(0 if t.split('+')[0] == '2.13.0' else f'torch was replaced: {t}')" \
 && /opt/fedq/bin/fedq --help > /dev/null

FROM ${BASE_IMAGE}
ARG FEDQ_UID=10001
COPY --from=build /opt/fedq /opt/fedq
# /runs is owned by fedq so that a named volume mounted there starts out writable for it.
RUN useradd --create-home --uid "${FEDQ_UID}" --user-group fedq \
 && mkdir -p /runs && chown fedq:fedq /runs
ENV PATH=/opt/fedq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    RAY_AUTH_MODE=disabled \
    RAY_USAGE_STATS_ENABLED=0
USER fedq
WORKDIR /home/fedq
ENTRYPOINT ["fedq"]
CMD ["--help"]
