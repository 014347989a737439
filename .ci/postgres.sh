#!/usr/bin/env bash
# Install PostgreSQL (Debian package), start it on loopback, create a database for tests,
# and write its SQLAlchemy URL to .ci/pg_url.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
pg_ctlcluster "$version" main start 2>/dev/null || true
for _ in $(seq 1 30); do
  su postgres -c "psql -h 127.0.0.1 -c 'select 1'" >/dev/null 2>&1 && break
  sleep 1
done
su postgres -c "psql -h 127.0.0.1 -qc \"DROP DATABASE IF EXISTS attncompose_test\""
su postgres -c "psql -h 127.0.0.1 -qc \"DO \\\$\\\$ BEGIN CREATE ROLE attncompose LOGIN PASSWORD 'attncompose'; EXCEPTION WHEN duplicate_object THEN NULL; END \\\$\\\$\""
su postgres -c "psql -h 127.0.0.1 -qc \"CREATE DATABASE attncompose_test OWNER attncompose\""
echo "postgresql+psycopg2://attncompose:attncompose@127.0.0.1/attncompose_test" > .ci/pg_url
