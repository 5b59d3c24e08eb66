# Stand-in for redis:7, for machines that cannot pull from a registry (deploy/check.sh builds it
# only when `docker pull redis:7` fails). Debian bookworm's Redis 7.0, from its packages, on the
# Debian base that deploy/check.sh imports as python:3.11-slim. Like the official image: data in
# /data (the working directory, so --appendonly writes there), the server run as user redis.
FROM python:3.11-slim
LABEL embedq.standin="Debian bookworm redis-server 7.0, deploy/standins/redis.Dockerfile"
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
