#!/usr/bin/env bash
# Cached `GET /api/v1/tasks` through the local cluster (issue: >= 10 000 req/s at 64 connections
# with p99 < 20 ms through `taskd serve --instances 4`).
#
#   bash scripts/bench-cluster.sh
#   INSTANCES=4 CONNECTIONS=64 DURATION=10 ROUNDS=3 PORT=18580 bash scripts/bench-cluster.sh
#
# Release build; fresh database `taskd_bench_cluster`; `taskd serve --instances $INSTANCES
# --log-level warn` on 127.0.0.1:$PORT (rate limits off, so the figure is the cache-hit path, not
# 429s); one user with 100 tasks; the 20-task first page warmed into the cache; then ROUNDS runs
# of wrk (-t2, CONNECTIONS keep-alive connections, DURATION s each) against it. Prints each
# round's req/s, p50, p99 and non-2xx, and the CPU time each request cost the workers, the
# supervisor + proxy process and Redis (from /proc: steadier than req/s on a shared machine);
# then the best round, and the supervisor's RSS afterwards. Settings pass through the
# environment, e.g. `TASKD_REDIS__POOL_SIZE=4 bash scripts/bench-cluster.sh`.
# Bounded by ROUNDS x DURATION; 127.0.0.1 only; stops the cluster on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

INSTANCES=${INSTANCES:-4}
CONNECTIONS=${CONNECTIONS:-64}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-18580}
ADMIN_PORT=$((PORT + 1))
BASE_PORT=$((PORT - 80))
PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
DB=taskd_bench_cluster
OUT=${BENCH_OUT:-target/bench-cluster}
mkdir -p "$OUT"

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
for tool in curl jq psql; do
  command -v "$tool" >/dev/null || { echo "bench-cluster: needs $tool" >&2; exit 2; }
done
if [ -z "${TASKD_BIN:-}" ]; then cargo build --profile dist -q --bin taskd; fi
BIN=${TASKD_BIN:-target/dist/taskd}

psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
export DATABASE_URL="$PG/$DB" TASKD_REDIS__KEY_PREFIX="bench-cluster:$$:" \
  TASKD_RATE_LIMIT__ENABLED=false TASKD_AUTH__ACCESS_TTL=1h
SERVE=""
cleanup() {
  if [ -n "$SERVE" ] && kill -0 "$SERVE" 2>/dev/null; then
    kill -TERM "$SERVE" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVE" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVE" 2>/dev/null || true
  fi
}
trap cleanup EXIT

$BIN --log-level warn serve --instances "$INSTANCES" --listen "127.0.0.1:$PORT" \
  --admin-listen "127.0.0.1:$ADMIN_PORT" --base-port "$BASE_PORT" >"$OUT/serve.log" 2>&1 &
SERVE=$!
for _ in $(seq 1 150); do
  ready=$(curl -fs "http://127.0.0.1:$ADMIN_PORT/status" 2>/dev/null \
    | jq '[.workers[] | select(.state == "ready")] | length' 2>/dev/null || echo 0)
  [ "$ready" = "$INSTANCES" ] && break
  sleep 0.2
done
[ "$ready" = "$INSTANCES" ] || { echo "bench-cluster: workers not ready; see $OUT/serve.log" >&2; exit 1; }

BASE="http://127.0.0.1:$PORT/api/v1"
TOKEN=$(curl -fs -X POST "$BASE/auth/register" -H 'Content-Type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password","name":"Bench"}' | jq -r .accessToken)
for i in $(seq 1 100); do
  echo "{\"title\":\"Task $i quarterly report\",\"priority\":\"high\",\"description\":\"benchmark data\"}"
done | xargs -d '\n' -P 4 -I{} curl -fs -o /dev/null -X POST "$BASE/tasks" \
  -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d {}
URL="$BASE/tasks?limit=20"
for _ in $(seq 1 "$INSTANCES"); do
  curl -fs -o /dev/null "$URL" -H "Authorization: Bearer $TOKEN"
done
cache=$(curl -fs -o /dev/null -D - "$URL" -H "Authorization: Bearer $TOKEN" | tr -d '\r' \
  | awk -F': ' 'tolower($1) == "x-cache" {print $2}')
[ "$cache" = "HIT" ] || { echo "bench-cluster: expected X-Cache: HIT, got '$cache'" >&2; exit 1; }

echo "GET /api/v1/tasks?limit=20 (cache hit) through taskd serve --instances $INSTANCES," \
  "wrk -t2 -c$CONNECTIONS -d${DURATION}s:"
. scripts/cpu.sh
WORKER_PIDS=$(pgrep -P "$SERVE" | tr '\n' ' ')
REDIS_PIDS=$(pgrep -x redis-server | tr '\n' ' ' || true)
best=0
for round in $(seq 1 "$ROUNDS"); do
  before=($(cpu_ticks $WORKER_PIDS) $(cpu_ticks "$SERVE") $(cpu_ticks $REDIS_PIDS))
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "Authorization: Bearer $TOKEN" "$URL" \
    >"$OUT/round$round.txt"
  rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/round$round.txt")
  p50=$(awk '$1=="50%" {print $2}' "$OUT/round$round.txt")
  p99=$(awk '$1=="99%" {print $2}' "$OUT/round$round.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$OUT/round$round.txt")
  after=($(cpu_ticks $WORKER_PIDS) $(cpu_ticks "$SERVE") $(cpu_ticks $REDIS_PIDS))
  requests=$(awk '/requests in/ {print $1}' "$OUT/round$round.txt")
  cpu="workers $(per_request $((after[0] - before[0])) "$requests")"
  cpu+=", supervisor+proxy $(per_request $((after[1] - before[1])) "$requests")"
  cpu+=", redis $(per_request $((after[2] - before[2])) "$requests")"
  printf 'round %d %10s req/s   p50 %-8s p99 %-8s non-2xx %s   CPU us/request: %s\n' \
    "$round" "$rps" "$p50" "$p99" "${non2xx:-0}" "$cpu"
  best=$(awk -v a="$best" -v b="$rps" 'BEGIN {print (b > a) ? b : a}')
done
echo "best: $best req/s"
echo "supervisor + proxy RSS: $(awk '/^VmRSS/ {printf "%d MiB", $2/1024}' /proc/$SERVE/status)"
