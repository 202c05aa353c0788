#!/usr/bin/env bash
# Redis killed during a load run (issue: zero 5xx, p99 < 100 ms while it is down, X-Cache: HIT
# again within 5 s of Redis returning).
#
#   bash scripts/redis-outage.sh       (PHASE=10 CONNECTIONS=64 to change)
#
# A private redis-server on a free port (not the machine's Redis), one release worker on
# 127.0.0.1 using it, and wrk at 64 connections on a cached 20-task page, in three phases of
# PHASE seconds: Redis up, Redis killed (SIGKILL), Redis restarted. Prints each phase's req/s,
# p50/p99 and non-2xx count, and how long after the restart the first X-Cache: HIT came back.
set -euo pipefail
cd "$(dirname "$0")/.."

PHASE=${PHASE:-10}
CONNECTIONS=${CONNECTIONS:-64}
PORT=${PORT:-3975}
REDIS_PORT=${REDIS_PORT:-6390}
PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
DB=taskd_redis_outage
OUT=${BENCH_OUT:-target/redis-outage}
mkdir -p "$OUT"

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
if [ -z "${TASKD_BIN:-}" ]; then cargo build --profile dist -q; fi
BIN=${TASKD_BIN:-target/dist/taskd}

start_redis() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize yes --pidfile "$PWD/$OUT/redis.pid" --logfile "$PWD/$OUT/redis.log"
  for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "redis did not start" >&2; exit 1
}
kill_redis() { kill -9 "$(cat "$OUT/redis.pid")" 2>/dev/null || true; }

psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
start_redis
export DATABASE_URL="$PG/$DB" REDIS_URL="redis://127.0.0.1:$REDIS_PORT" TASKD_AUTH__ACCESS_TTL=1h \
  TASKD_RATE_LIMIT__FREE=100000000
$BIN --log-level warn worker --host 127.0.0.1 --port "$PORT" >"$OUT/worker.log" 2>&1 &
WORKER=$!
trap 'kill $WORKER 2>/dev/null || true; wait $WORKER 2>/dev/null || true; kill_redis' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$PORT/health/ready" >/dev/null && break; sleep 0.2; done

BASE="http://127.0.0.1:$PORT/api/v1"
TOKEN=$(curl -fs -X POST "$BASE/auth/register" -H 'Content-Type: application/json' \
  -d '{"email":"outage@example.com","password":"outage-password","name":"Outage"}' | jq -r .accessToken)
for i in $(seq 1 100); do
  curl -fs -o /dev/null -X POST "$BASE/tasks" -H "Authorization: Bearer $TOKEN" \
    -H 'Content-Type: application/json' -d "{\"title\":\"Task $i\"}"
done
URL="$BASE/tasks?limit=20"

phase() {
  local label=$1
  wrk -t2 -c"$CONNECTIONS" -d"${PHASE}s" --latency -H "Authorization: Bearer $TOKEN" "$URL" >"$OUT/$label.txt"
  printf '%-16s %10s req/s   p50 %-8s p99 %-8s non-2xx %s  errors %s\n' "$label" \
    "$(awk '/Requests\/sec/ {print $2}' "$OUT/$label.txt")" \
    "$(awk '$1=="50%" {print $2}' "$OUT/$label.txt")" \
    "$(awk '$1=="99%" {print $2}' "$OUT/$label.txt")" \
    "$(awk '/Non-2xx/ {print $NF}' "$OUT/$label.txt" | grep . || echo 0)" \
    "$(awk '/Socket errors/ {print}' "$OUT/$label.txt" | grep . || echo none)"
}
x_cache() { curl -s -D - -o /dev/null "$URL" -H "Authorization: Bearer $TOKEN" | awk -F': ' 'tolower($1)=="x-cache" {print $2}' | tr -d '\r'; }

echo "GET $URL at $CONNECTIONS connections, ${PHASE}s per phase"
phase "redis up"
echo "X-Cache: $(x_cache)"
kill_redis
phase "redis killed"
echo "X-Cache: $(x_cache); readiness: $(curl -s "http://127.0.0.1:$PORT/health/ready" | jq -r .status)"
start_redis
restarted=$(date +%s%N)
elapsed_ms() { echo $(( ($(date +%s%N) - restarted) / 1000000 )); }
while [ "$(x_cache)" != HIT ]; do
  if [ "$(elapsed_ms)" -gt 30000 ]; then echo "no HIT 30 s after the restart" >&2; exit 1; fi
  sleep 0.05
done
echo "X-Cache: HIT again $(elapsed_ms) ms after Redis restarted; readiness: $(curl -s "http://127.0.0.1:$PORT/health/ready" | jq -r .status)"
phase "redis restarted"
echo "5xx responses logged by the worker: $(grep -c 'status=5[0-9][0-9]' "$OUT/worker.log" || true)"
