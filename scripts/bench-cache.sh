#!/usr/bin/env bash
# Cache hits vs misses on one worker, same run (issue: hit path >= 2x the miss path's throughput).
#
#   bash scripts/bench-cache.sh        (DURATION=15 CONNECTIONS=64 PORT=3970 to change)
#
# One release worker on 127.0.0.1 over a fresh database, one user with 500 tasks. Both phases
# fetch the same 20-task page of GET /api/v1/tasks with wrk at 64 keep-alive connections:
#   hit  - the same URL every time: served from Redis after the first request;
#   miss - a `dueBefore` far in the future that is different on every request: the same rows,
#          but a new cache key each time, so every request pays MGET + PostgreSQL + SET.
# Prints req/s and latency for each and the ratio. Bounded by DURATION per phase.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15}
CONNECTIONS=${CONNECTIONS:-64}
PORT=${PORT:-3970}
PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
DB=taskd_bench_cache
OUT=${BENCH_OUT:-target/bench-cache}
mkdir -p "$OUT"

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
if [ -z "${TASKD_BIN:-}" ]; then cargo build --profile dist -q; fi
BIN=${TASKD_BIN:-target/dist/taskd}

psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
export DATABASE_URL="$PG/$DB" TASKD_REDIS__KEY_PREFIX="bench-cache:$$:" TASKD_AUTH__ACCESS_TTL=1h \
  TASKD_RATE_LIMIT__ENABLED=false
$BIN --log-level warn worker --host 127.0.0.1 --port "$PORT" >"$OUT/worker.log" 2>&1 &
WORKER=$!
trap 'kill $WORKER 2>/dev/null || true; wait $WORKER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$PORT/health/ready" >/dev/null && break; sleep 0.2; done

BASE="http://127.0.0.1:$PORT/api/v1"
TOKEN=$(curl -fs -X POST "$BASE/auth/register" -H 'Content-Type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password","name":"Bench"}' | jq -r .accessToken)
for i in $(seq 1 500); do
  echo "{\"title\":\"Task $i quarterly report\",\"priority\":\"high\",\"dueAt\":\"2030-01-01T00:00:00Z\",\"description\":\"benchmark data\"}"
done | xargs -d '\n' -P 4 -I{} curl -fs -o /dev/null -X POST "$BASE/tasks" -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' -d {}

cat >"$OUT/miss.lua" <<'LUA'
local counter = 0
local threads = 0
function setup(thread) thread:set("id", threads); threads = threads + 1 end
function init() counter = id * 100000000 end
request = function()
  counter = counter + 1
  local path = string.format("/api/v1/tasks?limit=20&dueBefore=2100-01-01T00:00:00.%09dZ", counter)
  return wrk.format("GET", path)
end
LUA

run() {
  local label=$1; shift
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "Authorization: Bearer $TOKEN" "$@" >"$OUT/$label.txt"
  local rps p50 p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/$label.txt")
  p50=$(awk '$1=="50%" {print $2}' "$OUT/$label.txt")
  p99=$(awk '$1=="99%" {print $2}' "$OUT/$label.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$OUT/$label.txt")
  printf '%-5s %10s req/s   p50 %-8s p99 %-8s non-2xx %s\n' "$label" "$rps" "$p50" "$p99" "${non2xx:-0}"
  echo "$rps" >"$OUT/$label.rps"
}
curl -fs -o /dev/null "$BASE/tasks?limit=20" -H "Authorization: Bearer $TOKEN"   # warm the entry
echo "GET /api/v1/tasks?limit=20 (20 of 500 tasks), $CONNECTIONS connections, ${DURATION}s each:"
run hit "$BASE/tasks?limit=20"
run miss -s "$OUT/miss.lua" "http://127.0.0.1:$PORT"
hit_miss=$(curl -s "http://127.0.0.1:$PORT/metrics" | grep '^cache_requests_total' || true)
echo "$hit_miss"
awk -v h="$(cat "$OUT/hit.rps")" -v m="$(cat "$OUT/miss.rps")" 'BEGIN {printf "hit/miss throughput ratio: %.2f\n", h/m}'
echo "worker RSS: $(awk '/^VmRSS/ {printf "%d MiB", $2/1024}' /proc/$WORKER/status)"
