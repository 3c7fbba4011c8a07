FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tower_core ./tower_core
COPY collector ./collector
COPY reconciler ./reconciler
COPY dashboard ./dashboard
COPY connectors ./connectors
RUN pip install --no-cache-dir .
RUN mkdir -p /var/lib/tower/wal && chown -R nobody /var/lib/tower
USER nobody
ENTRYPOINT ["tower"]
