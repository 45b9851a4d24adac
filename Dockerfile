# syntax=docker/dockerfile:1
# policyd container image: a venv built in one stage, copied alone into a slim runtime stage.
#
#   docker build -t policyd .
#   docker run --rm -v ./docker-data/dms/config:/tmp/docker-mailserver:ro policyd check LOGIN SENDER
#
# There is no Docker engine in CI: tests/deploy/test_image.py replays the build stage's COPY and
# RUN steps on the host and runs the venv they produce. Keep those steps plain shell.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV VIRTUAL_ENV=/opt/policyd \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
RUN python -m venv "$VIRTUAL_ENV"

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
# With the ldap, pgsql and mysql extras, so the image reads ldap:, dms-ldap:, pgsql: and mysql:
# maps too.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; o = p["optional-dependencies"]; print(*p["dependencies"], *o["ldap"], *o["pgsql"], *o["mysql"], sep="\n")' > requirements.txt \
    && "$VIRTUAL_ENV/bin/pip" install -r requirements.txt

# Then the project itself, as a wheel, without touching the dependencies again.
COPY README.md LICENSE ./
COPY policyd/ policyd/
RUN --mount=type=cache,target=/root/.cache/pip \
    "$VIRTUAL_ENV/bin/pip" wheel --no-deps --wheel-dir dist . \
    && "$VIRTUAL_ENV/bin/pip" install --no-deps dist/policyd-*.whl


FROM ${PYTHON_IMAGE}
# A fixed UID/GID, so file permissions on mounted maps and Kubernetes' runAsUser can name it.
ARG UID=10040
ARG GID=10040
RUN groupadd --system --gid "$GID" policyd \
    && useradd --system --uid "$UID" --gid policyd --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin policyd

# Same path as in the build stage: the venv's scripts name their interpreter by absolute path.
COPY --from=build /opt/policyd /opt/policyd

# Listen beyond loopback: the container's network is the boundary. The maps are
# docker-mailserver's config directory, mounted read-only where docker-mailserver mounts it.
ENV VIRTUAL_ENV=/opt/policyd \
    PATH=/opt/policyd/bin:$PATH \
    POLICYD_LISTEN=inet:0.0.0.0:10040 \
    POLICYD_METRICS_LISTEN=inet:0.0.0.0:10041 \
    POLICYD_MAPS=dms:/tmp/docker-mailserver

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER ${UID}:${GID}
EXPOSE 10040 10041

# No curl in a slim image: Python asks /healthz on the port POLICYD_METRICS_LISTEN names.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('POLICYD_METRICS_LISTEN', ':10041').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

ENTRYPOINT ["policyd"]
CMD ["serve"]
