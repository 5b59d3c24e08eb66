# Stand-in for postgres:16, for machines that cannot pull from a registry (deploy/check.sh builds
# it only when `docker pull postgres:16` fails). Debian bookworm packages PostgreSQL 15, not 16:
# what the fleet uses (a database, a role with a password, SQL that 12 and later accept) is the
# same. The entrypoint honours POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB on an empty data
# folder as the official image's does, and runs the server as user postgres.
FROM python:3.11-slim
LABEL embedq.standin="Debian bookworm postgresql 15, deploy/standins/postgres.Dockerfile"
# No cluster from the package's postinst: the entrypoint makes one in PGDATA on first start.
RUN mkdir -p /etc/postgresql-common \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
    && apt-get update -q \
    && apt-get install -y -q --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENTRYPOINT ["docker-entrypoint.sh"]
EXPOSE 5432
STOPSIGNAL SIGINT
CMD ["postgres"]
