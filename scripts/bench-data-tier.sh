#!/usr/bin/env bash
# What the data-tier options cost, paired in one run: list throughput of workers that differ in
# one setting each, over the same data, cached and uncached:
#   base     - defaults: every read on the primary, named prepared statements;
#   replica  - `database.read_url` on a streaming replica (reads there once it has replayed the
#              caller's writes);
#   unnamed  - `database.prepared_statements = false`, straight to the primary: the cost of the
#              pooler mode itself (a transaction per statement, parsed each time);
#   bouncer  - the same through a PgBouncer in transaction mode (when pgbouncer is installed).
#
#   ROUNDS=4 DURATION=8 bash scripts/bench-data-tier.sh
#
# Makes a private primary and streaming replica (initdb + pg_basebackup, no apply delay) in a
# temporary directory on ports 5491/5492 of 127.0.0.1, a PgBouncer on 5495, and release workers
# on 3981-3984 over the same database and Redis prefix. After a warm-up, each round runs every
# worker (the order rotating from round to round):
#   cached   - the same 20-task page every time (served from Redis);
#   uncached - a new `dueBefore` on every request: MGET + PostgreSQL + SET each time.
# wrk, 2 threads, CONNECTIONS keep-alive connections, DURATION seconds per phase. Prints each
# phase and, for each worker, the ratio of its median to the base worker's. Everything stops with the script.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-32}
PRIMARY_PORT=5491 REPLICA_PORT=5492 BOUNCER_PORT=5495
OUT=${BENCH_OUT:-target/bench-data-tier}
mkdir -p "$OUT"

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
if [ -z "${TASKD_BIN:-}" ]; then cargo build --profile dist -q; fi
BIN=${TASKD_BIN:-target/dist/taskd}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

DIR=$(mktemp -d)
chmod 755 "$DIR"; [ "$(id -u)" = 0 ] && chown postgres "$DIR"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -f "$DIR/pgbouncer.pid" ] && kill "$(cat "$DIR/pgbouncer.pid")" 2>/dev/null || true
  for data in replica primary; do
    [ -d "$DIR/$data" ] && as_pg "$PGBIN/pg_ctl" -D "$DIR/$data" -m immediate stop >/dev/null 2>&1 || true
  done
  rm -rf "$DIR"
}
trap cleanup EXIT

as_pg "$PGBIN/initdb" -D "$DIR/primary" -U postgres -A trust --no-sync -E UTF8 >/dev/null
cat >>"$DIR/primary/postgresql.conf" <<EOF
port = $PRIMARY_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
wal_level = replica
max_wal_senders = 4
max_connections = 100
shared_buffers = 128MB
EOF
as_pg "$PGBIN/pg_ctl" -D "$DIR/primary" -l "$DIR/primary.log" -w start >/dev/null
as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -X stream -R -D "$DIR/replica"
printf 'port = %s\nhot_standby = on\n' "$REPLICA_PORT" >>"$DIR/replica/postgresql.conf"
as_pg "$PGBIN/pg_ctl" -D "$DIR/replica" -l "$DIR/replica.log" -w start >/dev/null

PRIMARY="postgres://postgres@127.0.0.1:$PRIMARY_PORT/taskd_bench"
export TASKD_REDIS__KEY_PREFIX="bench-data-tier:$$:" TASKD_AUTH__ACCESS_TTL=1h \
  TASKD_RATE_LIMIT__ENABLED=false DATABASE_URL="$PRIMARY"
start_worker() {
  local port=$1; shift
  env "$@" "$BIN" --log-level warn worker --host 127.0.0.1 --port "$port" >"$OUT/worker-$port.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/health/ready" >/dev/null && return; sleep 0.2; done
  echo "worker on $port did not become ready" >&2; cat "$OUT/worker-$port.log" >&2; exit 1
}
REPLICA="postgres://postgres@127.0.0.1:$REPLICA_PORT/taskd_bench"
declare -A PORT=([base]=3981 [replica]=3982 [unnamed]=3983 [bouncer]=3984)
start_worker "${PORT[base]}"
start_worker "${PORT[replica]}" TASKD_DATABASE__READ_URL="$REPLICA"
start_worker "${PORT[unnamed]}" TASKD_DATABASE__PREPARED_STATEMENTS=false
KINDS="base replica unnamed"
PGBOUNCER=$(command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null || true)
if [ -n "$PGBOUNCER" ]; then
  printf '"postgres" ""\n' >"$DIR/users.txt"
  cat >"$DIR/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$PRIMARY_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $DIR/users.txt
pool_mode = transaction
default_pool_size = 10
pidfile = $DIR/pgbouncer.pid
logfile = $DIR/pgbouncer.log
INI
  if [ "$(id -u)" = 0 ]; then chown postgres "$DIR/users.txt" "$DIR/pgbouncer.ini"; fi
  as_pg "$PGBOUNCER" -d "$DIR/pgbouncer.ini"
  start_worker "${PORT[bouncer]}" TASKD_DATABASE__PREPARED_STATEMENTS=false \
    DATABASE_URL="postgres://postgres@127.0.0.1:$BOUNCER_PORT/taskd_bench" TASKD_DATABASE__DIRECT_URL="$PRIMARY"
  KINDS="$KINDS bouncer"
fi

BASE="http://127.0.0.1:${PORT[base]}/api/v1"
TOKEN=$(curl -fs -X POST "$BASE/auth/register" -H 'Content-Type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password","name":"Bench"}' | jq -r .accessToken)
for i in $(seq 1 500); do
  echo "{\"title\":\"Task $i quarterly report\",\"priority\":\"high\",\"dueAt\":\"2030-01-01T00:00:00Z\"}"
done | xargs -d '\n' -P 4 -I{} curl -fs -o /dev/null -X POST "$BASE/tasks" -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' -d {}
# Until the replica has the writes and the set worker reads from it.
for _ in $(seq 1 100); do
  lag=$(curl -fs "http://127.0.0.1:${PORT[replica]}/health/ready" | jq -r .checks.replica.status)
  [ "$lag" = ok ] && break; sleep 0.1
done
sleep 1

cat >"$OUT/miss.lua" <<'LUA'
local counter = 0
local threads = 0
function setup(thread) thread:set("id", threads); threads = threads + 1 end
function init() counter = id * 100000000 + math.random(1, 1000000) * 1000 end
request = function()
  counter = counter + 1
  local path = string.format("/api/v1/tasks?limit=20&dueBefore=2100-01-01T00:00:00.%09dZ", counter)
  return wrk.format("GET", path)
end
LUA

phase() {
  local label=$1 port=$2; shift 2
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "Authorization: Bearer $TOKEN" "$@" \
    "http://127.0.0.1:$port${URL_PATH:-}" >"$OUT/$label.txt"
  local rps p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/$label.txt")
  p99=$(awk '$1=="99%" {print $2}' "$OUT/$label.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$OUT/$label.txt")
  printf '%-22s %10s req/s  p99 %-9s non-2xx %s\n' "$label" "$rps" "$p99" "${non2xx:-0}"
  echo "$rps" >>"$OUT/$(echo "$label" | cut -d' ' -f1-2 | tr ' ' _).all"
}
rm -f "$OUT"/*.all
echo "GET /api/v1/tasks?limit=20 (of 500 tasks), $CONNECTIONS connections, ${DURATION}s per phase, $ROUNDS rounds"
# Warm-up, not counted: every worker, both phases (the first rounds ran visibly slower).
for kind in $KINDS; do
  port=${PORT[$kind]}
  wrk -t2 -c"$CONNECTIONS" -d3s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$port/api/v1/tasks?limit=20" >/dev/null
  wrk -t2 -c"$CONNECTIONS" -d3s -H "Authorization: Bearer $TOKEN" -s "$OUT/miss.lua" "http://127.0.0.1:$port" >/dev/null
done
read -r -a kinds <<<"$KINDS"
for round in $(seq 1 "$ROUNDS"); do
  # The order rotates: round 1 base first, round 2 replica first, and so on.
  for i in $(seq 0 $((${#kinds[@]} - 1))); do
    kind=${kinds[$(((i + round - 1) % ${#kinds[@]}))]}
    port=${PORT[$kind]}
    curl -fs -o /dev/null "http://127.0.0.1:$port/api/v1/tasks?limit=20" -H "Authorization: Bearer $TOKEN"
    URL_PATH="/api/v1/tasks?limit=20" phase "cached $kind r$round" "$port"
    phase "uncached $kind r$round" "$port" -s "$OUT/miss.lua"
  done
done
median() { sort -n "$1" | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for phase in cached uncached; do
  b=$(median "$OUT/${phase}_base.all")
  for kind in $KINDS; do
    m=$(median "$OUT/${phase}_${kind}.all")
    awk -v p="$phase" -v k="$kind" -v m="$m" -v b="$b" 'BEGIN {printf "%-8s %-8s median %8.0f req/s  %.3f x base\n", p, k, m, m/b}'
  done
done
curl -fs "http://127.0.0.1:${PORT[replica]}/metrics" | grep '^db_reads_total' || true
echo "replica readiness: $(curl -fs "http://127.0.0.1:${PORT[replica]}/health/ready" | jq -c .checks.replica)"
