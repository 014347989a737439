#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on a free loopback port (installing the Debian package
# if needed) and print the URL of a fresh test database.
set -euo pipefail
if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
pgdata=$(mktemp -d)
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
chown postgres "$pgdata"
su postgres -c "$pgbin/initdb -D $pgdata -A trust -U postgres" >/dev/null
su postgres -c "$pgbin/pg_ctl -D $pgdata -o '-c listen_addresses=127.0.0.1 -p $port -k /tmp' -l $pgdata/log -w start" >/dev/null
psql -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE DATABASE attncompose_test;" >/dev/null
echo "postgresql://postgres@127.0.0.1:$port/attncompose_test"
