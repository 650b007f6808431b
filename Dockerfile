# syntax=docker/dockerfile:1
# The platform image for Docker users:
#
#   docker build -t capacity-platform:0.1.0 .
#
# The same recipe as `hack/image build platform` (which builds it without Docker, over an
# mmdebstrap root filesystem), reading the same files in hack/images/platform: packages.txt (the
# Debian packages), requirements.txt and pip.txt (the locked wheels), setup.sh (user, venv,
# installs) and image.conf (whose values the USER, ENV, WORKDIR, LABEL and CMD lines below repeat;
# tests/unit/test_image_recipes.py keeps them equal).

# Wheels only: the locked dependencies and the project's own wheel, for CPython 3.11 (bookworm's).
FROM python:3.11-slim-bookworm AS wheels
COPY hack/images/platform/pip.txt hack/images/platform/requirements.txt /recipe/
RUN python -m pip download --no-cache-dir --disable-pip-version-check --only-binary=:all: \
      --no-deps --dest /wheels/deps --requirement /recipe/pip.txt \
      --requirement /recipe/requirements.txt
COPY pyproject.toml README.md /src/
COPY api /src/api
COPY node-agent /src/node-agent
COPY operator /src/operator
COPY cli /src/cli
RUN python -m pip wheel --no-cache-dir --disable-pip-version-check --no-deps \
      --wheel-dir /wheels/project /src \
 && cp /wheels/deps/pip-*.whl /wheels/project/

FROM debian:bookworm-slim
ARG VERSION=0.1.0
RUN --mount=type=bind,source=hack/images/platform,target=/mnt/recipe \
    apt-get update \
 && sed -e 's/#.*//' /mnt/recipe/packages.txt | xargs apt-get install -y --no-install-recommends \
 && sh /mnt/recipe/setup.sh base
RUN --mount=type=bind,source=hack/images/platform,target=/mnt/recipe \
    --mount=type=bind,from=wheels,source=/wheels/deps,target=/mnt/wheels \
    sh /mnt/recipe/setup.sh deps /mnt/wheels
RUN --mount=type=bind,source=hack/images/platform,target=/mnt/recipe \
    --mount=type=bind,from=wheels,source=/wheels/project,target=/mnt/wheels \
    sh /mnt/recipe/setup.sh project /mnt/wheels
USER 10001:10001
ENV PATH=/opt/capacity/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/capacity
LABEL org.opencontainers.image.title="capacity-platform" \
      org.opencontainers.image.description="Capacity Platform: operator, node agent and capctl" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
CMD ["capctl", "--help"]
