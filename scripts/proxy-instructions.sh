#!/usr/bin/env bash
# Instructions the proxy executes per request, counted by valgrind's callgrind: user space only,
# and the same from run to run (within ~1 %) whatever else the machine is doing — unlike req/s or
# CPU time on a shared machine. For A/B of proxy changes: run it on two binaries, one after the
# other, and compare.
#
#   bash scripts/proxy-instructions.sh [BINARY...]     (default: target/release/taskd, built)
#   DURATION=8 CONNECTIONS=8 PORT=18790 bash scripts/proxy-instructions.sh
#
# For each binary: one `taskd worker` on 127.0.0.1:$PORT (fresh database taskd_proxy_instr), the
# binary's `taskd proxy` under callgrind on $PORT+1 in front of it, wrk warming up for 3 s, the
# counters zeroed, wrk on GET /health/live for DURATION s, the counters dumped; prints requests,
# instructions and instructions per request, and writes the callgrind file (for
# callgrind_annotate) under target/proxy-instructions/. Installs valgrind and wrk when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-8}
PORT=${PORT:-18790}
PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
DB=taskd_proxy_instr
OUT=target/proxy-instructions
mkdir -p "$OUT"

for tool in valgrind wrk; do
  if ! command -v "$tool" >/dev/null; then
    apt-get install -y -qq "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$tool" >/dev/null; }
  fi
done
for tool in callgrind_control callgrind_annotate curl psql; do
  command -v "$tool" >/dev/null || { echo "proxy-instructions: needs $tool" >&2; exit 2; }
done
if [ $# = 0 ]; then
  cargo build --release -q --bin taskd
  set -- target/release/taskd
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
  echo "proxy-instructions: $1 did not answer" >&2
  exit 1
}

PGOPTIONS="-c client_min_messages=warning" psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
printf '%-40s %10s %16s %14s\n' binary requests instructions "per request"
for bin in "$@"; do
  DATABASE_URL="$PG/$DB" "$bin" --log-level warn worker --host 127.0.0.1 --port "$PORT" \
    >"$OUT/worker.log" 2>&1 &
  worker=$!
  PIDS+=("$worker")
  wait_for "http://127.0.0.1:$PORT/health/ready" 100
  valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.%p" \
    "$bin" --log-level warn proxy --listen "127.0.0.1:$((PORT + 1))" \
    --upstream "http://127.0.0.1:$PORT" >"$OUT/proxy.log" 2>&1 &
  proxy=$!
  PIDS+=("$proxy")
  wait_for "http://127.0.0.1:$((PORT + 1))/health/live" 200
  url="http://127.0.0.1:$((PORT + 1))/health/live"
  wrk -t1 -c"$CONNECTIONS" -d3s "$url" >/dev/null
  callgrind_control -z "$proxy" >/dev/null 2>&1
  wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "$url" >"$OUT/wrk.txt"
  callgrind_control -d "$proxy" >/dev/null 2>&1
  requests=$(awk '/requests in/ {print $1}' "$OUT/wrk.txt")
  dump=$(ls -t "$OUT"/callgrind."$proxy".* | head -n 1)
  instructions=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  printf '%-40s %10s %16s %14s\n' "$bin" "$requests" "$instructions" "$((instructions / requests))"
  kill "$proxy" "$worker"
  wait "$proxy" "$worker" 2>/dev/null || true
  PIDS=()
done
echo "callgrind files: $OUT (callgrind_annotate FILE)"
