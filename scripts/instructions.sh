#!/usr/bin/env bash
# Instructions per request on a hot path, counted by valgrind's callgrind: user space only, and
# the same from run to run (within ~1 %) whatever else the machine is doing — unlike req/s or
# CPU time on a shared machine. For A/B of changes: run it on two binaries, one after the other,
# and compare.
#
#   bash scripts/instructions.sh [proxy|worker] [BINARY...]   (default: proxy, target/dist/taskd, built)
#   DURATION=8 CONNECTIONS=8 PORT=18790 bash scripts/instructions.sh worker
#
# proxy:  one `taskd worker` on 127.0.0.1:$PORT, the binary's `taskd proxy` under callgrind on
#         $PORT+1 in front of it; the request is GET /health/live through the proxy.
# worker: the binary's `taskd worker` under callgrind on $PORT (one runtime thread, rate limits
#         off, Redis cache on); one registered user with one task; the request is a cache hit of
#         GET /api/v1/tasks?limit=20 with the user's access token.
# For each binary (fresh database taskd_instructions): wrk warms up for 3 s, the counters are
# zeroed, wrk runs for DURATION s, the counters are dumped; prints requests, instructions and
# instructions per request, and writes the callgrind file (for callgrind_annotate) under
# target/instructions/. Installs valgrind and wrk when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

WHAT=proxy
case "${1:-}" in proxy | worker) WHAT=$1; shift ;; esac
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-8}
PORT=${PORT:-18790}
PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
DB=taskd_instructions
OUT=target/instructions
mkdir -p "$OUT"
# Every binary reads an empty configuration file: its own defaults, so an older binary (which
# rejects keys it does not know in ./config.toml) and a newer one are measured alike.
CONFIG=$OUT/defaults.toml
: >"$CONFIG"

for tool in valgrind wrk jq; do
  if ! command -v "$tool" >/dev/null; then
    apt-get install -y -qq "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$tool" >/dev/null; }
  fi
done
for tool in callgrind_control callgrind_annotate curl psql; do
  command -v "$tool" >/dev/null || { echo "instructions: needs $tool" >&2; exit 2; }
done
if [ $# = 0 ]; then
  cargo build --profile dist -q --bin taskd
  set -- target/dist/taskd
fi

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for URL TRIES: until URL answers 2xx (0.3 s apart).
wait_for() {
  for _ in $(seq 1 "$2"); do
    curl -fs -o /dev/null --max-time 1 "$1" && return 0
    sleep 0.3
  done
  echo "instructions: $1 did not answer" >&2
  exit 1
}

# start_proxy BIN: a plain worker, and BIN's proxy under callgrind in front of it. Sets
# $measured (the pid callgrind watches), $url and $headers (wrk's -H options: the request).
start_proxy() {
  DATABASE_URL="$PG/$DB" "$1" --config "$CONFIG" --log-level warn worker --host 127.0.0.1 --port "$PORT" \
    >"$OUT/worker.log" 2>&1 &
  PIDS+=("$!")
  wait_for "http://127.0.0.1:$PORT/health/ready" 100
  valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.%p" \
    "$1" --config "$CONFIG" --log-level warn proxy --listen "127.0.0.1:$((PORT + 1))" \
    --upstream "http://127.0.0.1:$PORT" >"$OUT/proxy.log" 2>&1 &
  measured=$!
  PIDS+=("$measured")
  url="http://127.0.0.1:$((PORT + 1))/health/live"
  wait_for "$url" 200
  headers=()
}

# start_worker BIN: BIN's worker under callgrind, a user with one task, its first page cached.
start_worker() {
  DATABASE_URL="$PG/$DB" TASKD_WORKER__THREADS=1 TASKD_RATE_LIMIT__ENABLED=false \
    valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.%p" \
    "$1" --config "$CONFIG" --log-level warn worker --host 127.0.0.1 --port "$PORT" >"$OUT/worker.log" 2>&1 &
  measured=$!
  PIDS+=("$measured")
  local base="http://127.0.0.1:$PORT"
  wait_for "$base/health/ready" 300
  local token
  token=$(curl -fs -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","password":"bench-password","name":"Bench"}' \
    "$base/api/v1/auth/register" | jq -r .accessToken)
  headers=(-H "Authorization: Bearer $token")
  curl -fs -o /dev/null "${headers[@]}" -H 'content-type: application/json' \
    -d '{"title":"one task"}' "$base/api/v1/tasks"
  url="$base/api/v1/tasks?limit=20"
  curl -fs -o /dev/null "${headers[@]}" "$url"
}

PGOPTIONS="-c client_min_messages=warning" psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
echo "$WHAT: instructions per request (callgrind)"
printf '%-40s %10s %16s %14s\n' binary requests instructions "per request"
for bin in "$@"; do
  "start_$WHAT" "$bin"
  wrk -t1 -c"$CONNECTIONS" -d3s "${headers[@]}" "$url" >/dev/null
  callgrind_control -z "$measured" >/dev/null 2>&1
  wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "${headers[@]}" "$url" >"$OUT/wrk.txt"
  callgrind_control -d "$measured" >/dev/null 2>&1
  requests=$(awk '/requests in/ {print $1}' "$OUT/wrk.txt")
  if grep -q "Non-2xx" "$OUT/wrk.txt"; then
    echo "instructions: some answers were not 2xx:" >&2
    cat "$OUT/wrk.txt" >&2
    exit 1
  fi
  dump=$(ls -t "$OUT"/callgrind."$measured".* | head -n 1)
  instructions=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  printf '%-40s %10s %16s %14s\n' "$bin" "$requests" "$instructions" "$((instructions / requests))"
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
  psql "$PG/postgres" -qc "DROP DATABASE $DB WITH (FORCE)" >/dev/null
done
echo "callgrind files: $OUT (callgrind_annotate FILE)"
