# ocicache in a container:
#   docker build -t ocicache .
#   docker run -p 5000:5000 -v ocicache:/cache ocicache
# The cache is a volume; the process runs as an unprivileged user (uid 10001, numeric so that
# Kubernetes' runAsNonRoot can check it); HEALTHCHECK asks /healthz on the default port (change
# it with the listen address, or use the orchestrator's probes: /healthz and /readyz).
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --user-group --home-dir /cache --no-create-home ocicache \
    && mkdir -p /cache && chown 10001:10001 /cache
USER 10001:10001
# The environment wins over a --config file: only the cache directory is set here (it is the
# volume); the listen address is the built-in 0.0.0.0:5000.
ENV OCICACHE_CACHE_DIR=/cache \
    PYTHONUNBUFFERED=1
VOLUME /cache
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["ocicache"]
CMD ["serve"]
