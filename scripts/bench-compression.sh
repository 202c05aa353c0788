#!/usr/bin/env bash
# Where compression should run: the proxy compressing every response on the fly, or the worker's
# cache sending variants it compressed once (docs/proxy.md#compression). Same run, same load.
#
#   bash scripts/bench-compression.sh
#   TASKD_BIN=target/dist/taskd DURATION=5 ROUNDS=3 CONNECTIONS=32 bash scripts/bench-compression.sh
#
# Starts, over a fresh database, two release workers on 127.0.0.1 that differ in one key:
# `cache.compression = true` ("cache": compressed variants kept in Redis) and `false` ("proxy":
# the worker sends plain JSON), each behind its own `taskd proxy` (`proxy.compression = true`).
# One user with 100 tasks; the request is GET /api/v1/tasks?limit=20, a cache hit (6.8 KB of
# JSON). For each coding (identity, br, zstd, gzip) and each side, wrk (keep-alive, CONNECTIONS
# connections, DURATION s, `Accept-Encoding: <coding>`) loads the proxy; the CPU time of the
# proxy and of the worker per request is read from /proc, the bytes of one response with curl.
# ROUNDS rounds, the order of the two sides alternating; the summary gives the median of each
# measure. Every process started here is stopped on exit. Installs wrk when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-32}
ROUNDS=${ROUNDS:-3}
BASE_PORT=${BASE_PORT:-3940}
PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
DB=${BENCH_DB:-taskd_bench_compression}
OUT=${BENCH_OUT:-target/bench-compression}
CODINGS=(identity br zstd gzip)

die() { echo "bench-compression: $*" >&2; exit 1; }
if ! command -v wrk >/dev/null; then
  apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
fi
for tool in curl jq psql wrk; do command -v "$tool" >/dev/null || die "$tool is needed"; done
if [ -z "${TASKD_BIN:-}" ]; then cargo build --profile dist -q --bin taskd; fi
BIN=${TASKD_BIN:-target/dist/taskd}
[ -x "$BIN" ] || die "no taskd binary at $BIN"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench-compression.XXXXXX")
. scripts/cpu.sh

PIDS=()
cleanup() {
  local status=$?
  set +e
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  [ "$status" = 0 ] || tail -n 20 "$TMP"/*.log >&2
  rm -rf "$TMP"
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() {
  for _ in $(seq 1 150); do
    curl -fs -o /dev/null --max-time 1 "$1" && return 0
    sleep 0.2
  done
  die "$1 did not answer within 30 s"
}

PGOPTIONS="-c client_min_messages=warning" psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
export DATABASE_URL="$PG/$DB" TASKD_AUTH__ACCESS_TTL=1h TASKD_RATE_LIMIT__ENABLED=false
"$BIN" --log-level warn migrate >"$TMP/migrate.log" 2>&1 || die "taskd migrate failed"

# side NAME CACHE_COMPRESSION OFFSET: a worker and its proxy; sets WORKER_PID_<NAME>,
# PROXY_PID_<NAME>, PORT_<NAME>.
side() {
  local name=$1 compression=$2 worker=$((BASE_PORT + $3)) proxy=$((BASE_PORT + $3 + 1))
  TASKD_CACHE__COMPRESSION=$compression TASKD_REDIS__KEY_PREFIX="bench-compression:$$:$name:" \
    TASKD_WORKER__THREADS=1 \
    "$BIN" --log-level warn worker --host 127.0.0.1 --port "$worker" --instance-id "$name" \
    >"$TMP/worker-$name.log" 2>&1 &
  PIDS+=($!)
  printf -v "WORKER_PID_$name" %s "$!"
  wait_http "http://127.0.0.1:$worker/health/ready"
  TASKD_PROXY__THREADS=1 "$BIN" --log-level warn proxy --listen "127.0.0.1:$proxy" \
    --upstream "http://127.0.0.1:$worker" --admin-listen "127.0.0.1:$((proxy + 1))" \
    >"$TMP/proxy-$name.log" 2>&1 &
  PIDS+=($!)
  printf -v "PROXY_PID_$name" %s "$!"
  printf -v "PORT_$name" %s "$proxy"
  wait_http "http://127.0.0.1:$proxy/health/live"
}
side cache true 0
side proxy false 10

API="http://127.0.0.1:$PORT_cache/api/v1"
TOKEN=$(curl -fs -X POST "$API/auth/register" -H 'Content-Type: application/json' \
  -d '{"email":"bench-compression@example.com","password":"bench-password","name":"Bench"}' | jq -r .accessToken)
[ -n "$TOKEN" ] && [ "$TOKEN" != null ] || die "cannot register the benchmark user"
for i in $(seq 1 100); do
  echo "{\"title\":\"Task $i quarterly report\",\"priority\":\"high\",\"description\":\"proxy benchmark data\"}"
done | xargs -d '\n' -P 4 -I{} curl -fs -o /dev/null -X POST "$API/tasks" \
  -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d {} \
  || die "cannot create the benchmark tasks"
PATH_Q="/api/v1/tasks?limit=20"

accept_for() { [ "$1" = identity ] && echo "Accept-Encoding: identity" || echo "Accept-Encoding: $1"; }

RESULTS="$OUT/runs.tsv"
printf 'coding\tside\tround\treq_s\tbytes\tencoding\tproxy_cpu_us\tworker_cpu_us\n' >"$RESULTS"
printf '%-8s %-6s %5s %10s %7s %-9s %10s %11s\n' coding side round req/s bytes sent-as "proxy cpu" "worker cpu"
for coding in "${CODINGS[@]}"; do
  for side in cache proxy; do
    port_var="PORT_$side"
    url="http://127.0.0.1:${!port_var}$PATH_Q"
    # Warm: the plain entry and the variant exist before anything is measured.
    for _ in 1 2 3; do curl -fs -o /dev/null -H "Authorization: Bearer $TOKEN" -H "$(accept_for "$coding")" "$url"; done
    wrk -t1 -c"$CONNECTIONS" -d2s -H "Authorization: Bearer $TOKEN" -H "$(accept_for "$coding")" "$url" >/dev/null
  done
done
for round in $(seq 1 "$ROUNDS"); do
  order=(cache proxy)
  [ $((round % 2)) = 0 ] && order=(proxy cache)
  for coding in "${CODINGS[@]}"; do
    for side in "${order[@]}"; do
      port_var="PORT_$side" proxy_var="PROXY_PID_$side" worker_var="WORKER_PID_$side"
      url="http://127.0.0.1:${!port_var}$PATH_Q"
      meta=$(curl -fs -o /dev/null -D - -w 'bytes=%{size_download}\n' -H "Authorization: Bearer $TOKEN" \
        -H "$(accept_for "$coding")" "$url")
      bytes=$(sed -n 's/^bytes=//p' <<<"$meta")
      sent_as=$(tr -d '\r' <<<"$meta" | awk -F': ' 'tolower($1) == "content-encoding" {print $2}')
      proxy_before=$(cpu_ticks "${!proxy_var}")
      worker_before=$(cpu_ticks "${!worker_var}")
      wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -H "Authorization: Bearer $TOKEN" \
        -H "$(accept_for "$coding")" "$url" >"$TMP/wrk.txt" 2>&1 || die "wrk failed: $(cat "$TMP/wrk.txt")"
      grep -q 'Non-2xx' "$TMP/wrk.txt" && die "non-2xx answers: $(cat "$TMP/wrk.txt")"
      requests=$(awk '/requests in/ {print $1}' "$TMP/wrk.txt")
      rps=$(awk '/Requests\/sec/ {print $2}' "$TMP/wrk.txt")
      proxy_cpu=$(per_request $(($(cpu_ticks "${!proxy_var}") - proxy_before)) "$requests")
      worker_cpu=$(per_request $(($(cpu_ticks "${!worker_var}") - worker_before)) "$requests")
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$coding" "$side" "$round" "$rps" "$bytes" \
        "${sent_as:-identity}" "$proxy_cpu" "$worker_cpu" >>"$RESULTS"
      printf '%-8s %-6s %5s %10s %7s %-9s %10s %11s\n' "$coding" "$side" "$round" "$rps" "$bytes" \
        "${sent_as:-identity}" "$proxy_cpu" "$worker_cpu"
    done
  done
done

echo
echo "medians over $ROUNDS rounds (CPU in microseconds per request, user + system):"
awk -F'\t' '
  NR == 1 { next }
  { key = $1 "\t" $2; n[key]++; rps[key, n[key]] = $4; pc[key, n[key]] = $7; wc[key, n[key]] = $8
    bytes[key] = $5; enc[key] = $6; if (!(key in seen)) { seen[key] = 1; order[++k] = key } }
  function median(a, key, m,    i, j, t, v) {
    for (i = 1; i <= m; i++) v[i] = a[key, i] + 0
    for (i = 2; i <= m; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
    return (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
  }
  END {
    printf "%-8s %-6s %10s %7s %-9s %10s %11s %10s\n", "coding", "side", "req/s", "bytes", "sent-as", "proxy cpu", "worker cpu", "total cpu"
    for (i = 1; i <= k; i++) {
      key = order[i]; m = n[key]; split(key, parts, "\t")
      p = median(pc, key, m); w = median(wc, key, m)
      printf "%-8s %-6s %10.0f %7d %-9s %10.1f %11.1f %10.1f\n", parts[1], parts[2], median(rps, key, m), bytes[key], enc[key], p, w, p + w
    }
  }' "$RESULTS" | tee "$OUT/summary.txt"
echo "runs: $RESULTS"
