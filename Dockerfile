# JouleGate: energy-aware, OpenAI-compatible inference proxy.
#
#   docker build -t joulegate:0.1.0 .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/config.yaml:/etc/joulegate/config.yaml:ro" \
#     -e UPSTREAM_KEY=... joulegate:0.1.0
#
# The config is a mounted file ($JOULEGATE_CONFIG, default /etc/joulegate/config.yaml); secrets
# come in as environment variables that the config names as ${VAR} (docs/deploy.md). The same
# image runs the GPU power agent: `docker run --gpus all ... joulegate:0.1.0 agent`.
#
# Both stages use the same base image: the venv copied into the final stage points at the base
# image's interpreter (/usr/local/bin/python3.11).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: resolve and install everything into /opt/venv -------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv

# Dependencies first, from pyproject.toml alone, so that editing the source does not
# reinstall them. Every dependency ships manylinux wheels for amd64 and arm64, so no compiler
# is needed even here; their versions are bounded in pyproject.toml, the single source of truth.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

COPY proxy ./proxy
COPY policies ./policies
# Then the project itself; pip, setuptools and wheel are not needed at run time.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools wheel \
    && /opt/venv/bin/joulegate --help > /dev/null

# ---- final: the base image, the venv, a non-root user ---------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="joulegate" \
      org.opencontainers.image.description="Energy-aware, OpenAI-compatible inference proxy: joules and tokens per joule for every request." \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric UID/GID, so that Kubernetes' runAsNonRoot can verify it. /etc/joulegate is
# writable by it only so that a config mounted as a single file, without `ledger:`, can keep its
# default SQLite ledger beside it; set `ledger:` to a path under /var/lib/joulegate instead.
RUN groupadd --system --gid 10001 joulegate \
    && useradd --system --uid 10001 --gid joulegate --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin joulegate \
    && mkdir -p /etc/joulegate /var/lib/joulegate \
    && chown joulegate:joulegate /etc/joulegate /var/lib/joulegate

COPY --from=builder /opt/venv /opt/venv

# JOULEGATE_HEALTH_URL is read by the HEALTHCHECK only: point it at the agent's port
# (http://127.0.0.1:9464/healthz) when the container runs `agent`.
# NVIDIA_DRIVER_CAPABILITIES: the agent needs NVML only (`utility`); the NVIDIA runtime injects
# the driver libraries only into containers that also set NVIDIA_VISIBLE_DEVICES (or --gpus).
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    JOULEGATE_CONFIG=/etc/joulegate/config.yaml \
    JOULEGATE_HEALTH_URL=http://127.0.0.1:8080/healthz \
    NVIDIA_DRIVER_CAPABILITIES=utility

# The SQLite ledger (`ledger: sqlite:///var/lib/joulegate/ledger.db`) lives here when no Redis
# is used; mount a volume on it to keep the ledger.
VOLUME ["/var/lib/joulegate"]

USER 10001:10001
WORKDIR /var/lib/joulegate
EXPOSE 8080

# No curl in the slim image: the standard library does the probe. An agent with a token
# ($JOULEGATE_AGENT_TOKEN) wants it on /healthz too.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; t = os.environ.get('JOULEGATE_AGENT_TOKEN'); sys.exit(0 if u.urlopen(u.Request(os.environ['JOULEGATE_HEALTH_URL'], headers={'Authorization': 'Bearer ' + t} if t else {}), timeout=4).status == 200 else 1)"]

ENTRYPOINT ["joulegate"]
# server.host in the config defaults to 127.0.0.1; in a container it must listen on all
# interfaces. Arguments after the image name replace this whole line (e.g. `agent`).
CMD ["serve", "--host", "0.0.0.0"]
