#!/usr/bin/env bash
# taskd proxy vs NGINX in front of the same workers, same run (docs/contract.md §7 "proxy vs NGINX":
# taskd's throughput >= NGINX's and p99 <= NGINX's at 64 keep-alive connections).
#
#   bash scripts/bench-proxy-nginx.sh
#   DURATION=5 CONNECTIONS=64 WORKERS=2 ROUNDS=8 BASE_PORT=3980 bash scripts/bench-proxy-nginx.sh
#
# Installs NGINX and wrk from Debian's packages when missing and builds taskd (profile dist). Starts
# WORKERS release workers on 127.0.0.1 over a fresh database (rate limits off), NGINX (worker
# processes: auto; an upstream block with `keepalive 64`, HTTP/1.1 and an empty Connection header
# as NGINX's docs say; the same X-Forwarded-* and X-Request-Id headers taskd sets; access log off)
# and `taskd proxy`, each on its own port in front of the same workers. After a warm-up, wrk
# (keep-alive, CONNECTIONS connections, DURATION seconds) loads each proxy in turn on two
# endpoints:
#   GET /health/live        - nearly free in the worker: the proxy's own cost dominates;
#   GET /api/v1/tasks       - an authenticated 20-task page, a Redis cache hit after the first.
# A round is one run of each proxy on an endpoint, back to back, the order alternating from round
# to round. This machine's speed drifts by tens of per cent within minutes, more than the two
# proxies differ, so the verdict pairs the runs: each round gives a ratio taskd/NGINX measured
# seconds apart, and the summary takes the median of those ratios over ROUNDS rounds (their range
# too), for throughput (want >= 1), p99 (want <= 1) and the proxy's CPU time per request (read
# from /proc: what a request costs). The best run of each proxy (highest req/s) is printed as
# well, then each proxy's memory. Every run is printed and kept in runs.tsv.
#
# Before/after a change: TASKD_BASE_BIN=<the previous binary> adds a third proxy, `base` (that
# binary's `taskd proxy`, same workers), to every round (the order rotating), and the summary adds
# the ratios base/nginx and taskd/base, so "within 2 % of before" is read from one run.
#
# HTTPS: TLS=1 loads both proxies over TLS instead (a self-signed P-256 certificate made here with
# openssl; NGINX `listen ... ssl` with TLSv1.2 TLSv1.3, taskd `--tls-cert/--tls-key`), keep-alive
# as before, so what is measured is steady-state encryption, not handshakes. The base binary is
# left out (it has no HTTPS).
#
# Handshakes: HANDSHAKES=1 (with TLS=1) sends every request with `Connection: close`, so each is
# a new connection and a full TLS handshake (wrk resumes no sessions): the handshake rate.
#
# Ports (127.0.0.1 only): NGINX BASE_PORT, taskd BASE_PORT+1, its admin BASE_PORT+2, HTTPS
# NGINX BASE_PORT+5 and taskd BASE_PORT+6, workers BASE_PORT+10.. . Every process started here
# is stopped on exit; exits non-zero when anything fails to start or a load run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}           # seconds per measured run
WARMUP=${WARMUP:-3}               # seconds of warm-up per proxy and endpoint
CONNECTIONS=${CONNECTIONS:-64}
WORKERS=${WORKERS:-2}
ROUNDS=${ROUNDS:-8}               # measured runs per proxy and endpoint (paired rounds)
WRK_THREADS=${WRK_THREADS:-2}
BASE_PORT=${BASE_PORT:-3980}
PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
DB=${BENCH_DB:-taskd_bench_proxy}
OUT=${BENCH_OUT:-target/bench-proxy-nginx}
TLS=${TLS:-0}
HANDSHAKES=${HANDSHAKES:-0}      # with TLS=1: a new connection (full handshake) per request

NGINX_PORT=$BASE_PORT
TASKD_PORT=$((BASE_PORT + 1))
ADMIN_PORT=$((BASE_PORT + 2))
BASE_PROXY_PORT=$((BASE_PORT + 3))
BASE_ADMIN_PORT=$((BASE_PORT + 4))
NGINX_TLS_PORT=$((BASE_PORT + 5))
TASKD_TLS_PORT=$((BASE_PORT + 6))
WORKER_BASE=$((BASE_PORT + 10))

die() { echo "bench-proxy-nginx: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_ready=
apt_install() {
  if [ -z "$apt_ready" ]; then as_root apt-get update -qq; apt_ready=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# --- tools -------------------------------------------------------------------------------------
NGINX=$(command -v nginx || true)
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx
if [ -z "$NGINX" ]; then
  echo "installing nginx"
  apt_install nginx
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
fi
if ! command -v wrk >/dev/null; then
  echo "installing wrk"
  apt_install wrk
fi
for tool in curl jq psql; do command -v "$tool" >/dev/null || die "$tool is needed"; done
[ "$TLS" = 0 ] || command -v openssl >/dev/null || die "openssl is needed for TLS=1"
SCHEME=http
[ "$TLS" = 0 ] || SCHEME=https
if [ -z "${TASKD_BIN:-}" ]; then cargo build --profile dist -q; fi
BIN=${TASKD_BIN:-target/dist/taskd}
[ -x "$BIN" ] || die "no taskd binary at $BIN"
BASE_BIN=${TASKD_BASE_BIN:-}
[ -z "$BASE_BIN" ] || [ -x "$BASE_BIN" ] || die "no taskd binary at TASKD_BASE_BIN=$BASE_BIN"
PROXIES=(nginx taskd)
if [ -n "$BASE_BIN" ] && [ "$TLS" != 0 ]; then
  echo "TLS=1: the base binary has no HTTPS; comparing taskd and NGINX only" >&2
  BASE_BIN=
fi
[ -z "$BASE_BIN" ] || PROXIES+=(base)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/bench-proxy-nginx.XXXXXX")

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$NGINX_PORT" "$TASKD_PORT" "$ADMIN_PORT" "$BASE_PROXY_PORT" "$BASE_ADMIN_PORT" "$NGINX_TLS_PORT" "$TASKD_TLS_PORT" $(seq "$WORKER_BASE" $((WORKER_BASE + WORKERS - 1))); do
  port_free "$port" || die "port $port is in use (set BASE_PORT)"
done

# --- cleanup: every process started here, by pid ---------------------------------------------
PIDS=()
NGINX_PID=
TASKD_PID=
BASE_PID=
FAILED_RUNS=0
cleanup() {
  local status=$?
  set +e
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [ "$status" != 0 ]; then
    for log in "$TMP"/*.log; do
      [ -s "$log" ] && { echo "--- $(basename "$log") (last lines)"; tail -n 20 "$log"; } >&2
    done
  fi
  cp "$TMP"/*.log "$OUT"/ 2>/dev/null
  rm -rf "$TMP"
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_http URL PID NAME: until URL answers 2xx, failing when PID exits or after 30 s.
wait_http() {
  for _ in $(seq 1 150); do
    curl -fs -o /dev/null --max-time 1 "$1" && return 0
    kill -0 "$2" 2>/dev/null || die "$3 exited while starting"
    sleep 0.2
  done
  die "$3 did not answer $1 within 30 s"
}

# --- workers -----------------------------------------------------------------------------------
PGOPTIONS="-c client_min_messages=warning" psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
export DATABASE_URL="$PG/$DB" TASKD_REDIS__KEY_PREFIX="bench-proxy:$$:" TASKD_AUTH__ACCESS_TTL=1h \
  TASKD_RATE_LIMIT__ENABLED=false
"$BIN" --log-level warn migrate >"$TMP/migrate.log" 2>&1 || die "taskd migrate failed"
UPSTREAMS=()
NGINX_SERVERS=
for i in $(seq 0 $((WORKERS - 1))); do
  port=$((WORKER_BASE + i))
  "$BIN" --log-level warn worker --host 127.0.0.1 --port "$port" --instance-id "w$i" \
    >"$TMP/worker-$i.log" 2>&1 &
  PIDS+=($!)
  UPSTREAMS+=(--upstream "http://127.0.0.1:$port")
  NGINX_SERVERS+="    server 127.0.0.1:$port;"$'\n'
done
for i in $(seq 0 $((WORKERS - 1))); do
  wait_http "http://127.0.0.1:$((WORKER_BASE + i))/health/ready" "${PIDS[$i]}" "worker $i"
done

API="http://127.0.0.1:$WORKER_BASE/api/v1"
TOKEN=$(curl -fs -X POST "$API/auth/register" -H 'Content-Type: application/json' \
  -d '{"email":"bench-proxy@example.com","password":"bench-password","name":"Bench"}' | jq -r .accessToken) \
  || die "cannot register the benchmark user"
[ -n "$TOKEN" ] && [ "$TOKEN" != null ] || die "cannot register the benchmark user"
for i in $(seq 1 100); do
  echo "{\"title\":\"Task $i quarterly report\",\"priority\":\"high\",\"description\":\"proxy benchmark data\"}"
done | xargs -d '\n' -P 4 -I{} curl -fs -o /dev/null -X POST "$API/tasks" \
  -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d {} \
  || die "cannot create the benchmark tasks"

# --- NGINX -------------------------------------------------------------------------------------
mkdir -p "$TMP/nginx"
NGINX_TLS=
TASKD_TLS=()
if [ "$TLS" != 0 ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$TMP/key.pem" -out "$TMP/cert.pem" \
    >"$TMP/openssl.log" 2>&1 || die "openssl could not make a certificate: $(cat "$TMP/openssl.log")"
  NGINX_TLS="listen 127.0.0.1:$NGINX_TLS_PORT ssl reuseport;
        ssl_certificate $TMP/cert.pem;
        ssl_certificate_key $TMP/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;"
  TASKD_TLS=(--tls-cert "$TMP/cert.pem" --tls-key "$TMP/key.pem" --tls-listen "127.0.0.1:$TASKD_TLS_PORT")
fi
NGINX_USER=
[ "$(id -u)" = 0 ] && NGINX_USER="user $(id -un) $(id -gn);"
cat >"$TMP/nginx.conf" <<CONF
# Written by scripts/bench-proxy-nginx.sh.
$NGINX_USER
worker_processes auto;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    # Keep wrk's connections open for the whole run, as taskd does (NGINX's default closes a
    # client connection after 1000 requests).
    keepalive_requests 1000000;
    # X-Request-Id only when the client sent none, as taskd does.
    map \$http_x_request_id \$bench_request_id {
        default \$http_x_request_id;
        ""      \$request_id;
    }

    upstream taskd_workers {
$NGINX_SERVERS
        # Keep-alive to the workers, as in https://nginx.org/en/docs/http/ngx_http_upstream_module.html#keepalive
        keepalive 64;
        keepalive_requests 1000000;
    }

    server {
        listen 127.0.0.1:$NGINX_PORT reuseport;
        $NGINX_TLS
        location / {
            proxy_pass http://taskd_workers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # The headers taskd proxy sets (docs/contract.md §5): Host kept, X-Forwarded-For replaced by the
            # peer (clients are untrusted), X-Forwarded-Proto/Host, X-Request-Id when absent.
            proxy_set_header Host \$http_host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_set_header X-Request-Id \$bench_request_id;
        }
    }
}
CONF
"$NGINX" -t -q -p "$TMP/nginx" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf" \
  >"$TMP/nginx-test.log" 2>&1 || die "nginx rejected its config: $(cat "$TMP/nginx-test.log")"
"$NGINX" -p "$TMP/nginx" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf" -g 'daemon off;' \
  >"$TMP/nginx.log" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_http "http://127.0.0.1:$NGINX_PORT/health/live" "$NGINX_PID" nginx

# --- taskd proxy -------------------------------------------------------------------------------
"$BIN" --log-level warn proxy --listen "127.0.0.1:$TASKD_PORT" "${UPSTREAMS[@]}" \
  --admin-listen "127.0.0.1:$ADMIN_PORT" "${TASKD_TLS[@]}" >"$TMP/taskd-proxy.log" 2>&1 &
TASKD_PID=$!
PIDS+=("$TASKD_PID")
wait_http "http://127.0.0.1:$TASKD_PORT/health/live" "$TASKD_PID" "taskd proxy"
if [ -n "$BASE_BIN" ]; then
  # An empty configuration file: the base binary's own defaults (config.toml documents the
  # defaults of this checkout, and may hold keys the older binary does not know).
  : >"$TMP/base-config.toml"
  "$BASE_BIN" --config "$TMP/base-config.toml" --log-level warn proxy --listen "127.0.0.1:$BASE_PROXY_PORT" "${UPSTREAMS[@]}" \
    --admin-listen "127.0.0.1:$BASE_ADMIN_PORT" >"$TMP/base-proxy.log" 2>&1 &
  BASE_PID=$!
  PIDS+=("$BASE_PID")
  wait_http "http://127.0.0.1:$BASE_PROXY_PORT/health/live" "$BASE_PID" "base taskd proxy"
fi

# --- load --------------------------------------------------------------------------------------
ENDPOINTS=("/health/live" "/api/v1/tasks?limit=20")
port_of() {
  if [ "$TLS" != 0 ]; then
    case $1 in nginx) echo "$NGINX_TLS_PORT" ;; *) echo "$TASKD_TLS_PORT" ;; esac
    return
  fi
  case $1 in nginx) echo "$NGINX_PORT" ;; base) echo "$BASE_PROXY_PORT" ;; *) echo "$TASKD_PORT" ;; esac
}
auth_for() { case $1 in /api/*) printf '%s\n' -H "Authorization: Bearer $TOKEN" ;; esac; }

. scripts/cpu.sh

# Latency as wrk prints it (850.00us, 1.23ms, 2.00s) in milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
    printf "%.3f", n }'
}

# load PROXY ENDPOINT SECONDS FILE: one wrk run; fails on socket errors or non-2xx answers.
load() {
  local proxy=$1 endpoint=$2 seconds=$3 file=$4 auth=()
  mapfile -t auth < <(auth_for "$endpoint")
  [ "$HANDSHAKES" = 0 ] || auth+=(-H "Connection: close")
  wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${seconds}s" --timeout 5s --latency "${auth[@]}" \
    "$SCHEME://127.0.0.1:$(port_of "$proxy")$endpoint" >"$file" 2>&1 || die "wrk failed: $(cat "$file")"
  if grep -qE 'Non-2xx|Socket errors' "$file"; then
    echo "!! $proxy $endpoint: $(grep -E 'Non-2xx|Socket errors' "$file" | tr -s ' ' | paste -sd';')" >&2
    FAILED_RUNS=$((FAILED_RUNS + 1))
  fi
}

echo "workers: $WORKERS   nginx: 127.0.0.1:$NGINX_PORT   taskd proxy: 127.0.0.1:$TASKD_PORT${BASE_BIN:+   base proxy ($BASE_BIN): 127.0.0.1:$BASE_PROXY_PORT}"
echo "wrk: $WRK_THREADS threads, $CONNECTIONS keep-alive connections, ${DURATION}s a run, $ROUNDS rounds, over $SCHEME"
echo "warming up (${WARMUP}s per proxy and endpoint)"
for endpoint in "${ENDPOINTS[@]}"; do
  for proxy in "${PROXIES[@]}"; do load "$proxy" "$endpoint" "$WARMUP" "$TMP/warmup.txt"; done
done

RESULTS="$OUT/runs.tsv"
printf 'endpoint\tproxy\tround\treq_s\tp50_ms\tp99_ms\tproxy_cpu_us\tworkers_cpu_us\terrors\n' >"$RESULTS"
echo
echo "(proxy cpu, workers cpu: CPU time per request in microseconds, user + system, from /proc)"
printf '%-24s %-6s %5s %12s %10s %10s %9s %9s  %s\n' endpoint proxy round req/s p50 p99 \
  "proxy cpu" "wrk. cpu" errors
for round in $(seq 1 "$ROUNDS"); do
  # Rotate which proxy goes first so a drifting machine favours none: with two, they alternate.
  shift_by=$(((round - 1) % ${#PROXIES[@]}))
  order=("${PROXIES[@]:$shift_by}" "${PROXIES[@]:0:$shift_by}")
  for endpoint in "${ENDPOINTS[@]}"; do
    for proxy in "${order[@]}"; do
      file="$TMP/run.txt"
      case $proxy in
        nginx) proxy_pids="$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')" ;;
        base) proxy_pids=$BASE_PID ;;
        *) proxy_pids=$TASKD_PID ;;
      esac
      proxy_before=$(cpu_ticks $proxy_pids)
      workers_before=$(cpu_ticks "${PIDS[@]:0:$WORKERS}")
      load "$proxy" "$endpoint" "$DURATION" "$file"
      requests=$(awk '/requests in/ {print $1}' "$file")
      proxy_cpu=$(per_request $(($(cpu_ticks $proxy_pids) - proxy_before)) "$requests")
      workers_cpu=$(per_request $(($(cpu_ticks "${PIDS[@]:0:$WORKERS}") - workers_before)) "$requests")
      rps=$(awk '/Requests\/sec/ {print $2}' "$file")
      p50=$(to_ms "$(awk '$1=="50%" {print $2}' "$file")")
      p99=$(to_ms "$(awk '$1=="99%" {print $2}' "$file")")
      errors=$(grep -E 'Non-2xx|Socket errors' "$file" | tr -s ' ' | paste -sd';' || true)
      [ -n "$rps" ] || die "no result from wrk: $(cat "$file")"
      cp "$file" "$OUT/wrk-$proxy-$round-$(echo "$endpoint" | tr -c 'a-z0-9\n' '_').txt"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$endpoint" "$proxy" "$round" "$rps" "$p50" "$p99" \
        "$proxy_cpu" "$workers_cpu" "${errors:-0}" >>"$RESULTS"
      printf '%-24s %-6s %5s %12s %8sms %8sms %9s %9s  %s\n' "$endpoint" "$proxy" "$round" "$rps" "$p50" \
        "$p99" "$proxy_cpu" "$workers_cpu" "${errors:-0}"
    done
  done
done

# --- summary -----------------------------------------------------------------------------------
echo
awk -F'\t' -v conns="$CONNECTIONS" -v workers="$WORKERS" '
  NR == 1 { next }
  {
    key = $1 SUBSEP $2
    if (!(key in rps) || $4 + 0 > rps[key]) { rps[key] = $4 + 0; p50[key] = $5; p99[key] = $6 }
    if (!($1 in seen)) { seen[$1] = 1; order[++n] = $1 }
    run[$1, $2, $3, "rps"] = $4; run[$1, $2, $3, "p99"] = $6; run[$1, $2, $3, "cpu"] = $7
    # The proxy CPU per request over the workers CPU per request of the same run: the workers
    # are the same in both runs, so they absorb the phase of the machine (everything costs more CPU
    # per request in a slow phase) and this ratio moves by ~2 % between rounds, not ~20 %.
    if ($8 + 0 > 0) run[$1, $2, $3, "cpun"] = $7 / $8
    if ($3 + 0 > rounds) rounds = $3 + 0
    if ($2 == "base") has_base = 1
  }
  # Sorts v[1..k] in place (insertion sort: a handful of values).
  function sort(v, k,    i, j, t) {
    for (i = 2; i <= k; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
  }
  function median(v, k) { return (k % 2) ? v[(k + 1) / 2] : (v[k / 2] + v[k / 2 + 1]) / 2 }
  # "median (min-max)" of the per-round ratios x/y (default taskd/nginx) of one measure (rps,
  # p99, cpu) of endpoint e; sets last_median ("" when no round has both).
  function ratios(e, what, x, y,    r, k, v, a, b) {
    if (x == "") { x = "taskd"; y = "nginx" }
    k = 0; last_median = ""
    for (r = 1; r <= rounds; r++) {
      a = run[e, x, r, what]; b = run[e, y, r, what]
      if (a + 0 > 0 && b + 0 > 0) v[++k] = a / b
    }
    if (k == 0) return "n/a"
    sort(v, k)
    last_median = median(v, k)
    return sprintf("%.3fx (%.2f-%.2f)", last_median, v[1], v[k])
  }
  END {
    printf "paired rounds (each round: both proxies back to back; ratio taskd/nginx, median of %d rounds, range), %d connections, %d workers:\n", rounds, conns, workers
    for (i = 1; i <= n; i++) {
      e = order[i]
      t = ratios(e, "rps"); tm = last_median
      l = ratios(e, "p99"); lm = last_median
      c = ratios(e, "cpu")
      w = ratios(e, "cpun")
      printf "%-24s throughput %-22s %s\n", e, t, (tm == "") ? "" : (tm >= 1) ? "ok (want >= 1)" : "BELOW NGINX (want >= 1)"
      printf "%-24s p99        %-22s %s\n", "", l, (lm == "") ? "" : (lm <= 1) ? "ok (want <= 1)" : "ABOVE NGINX (want <= 1)"
      printf "%-24s proxy CPU per request %s\n", "", c
      printf "%-24s proxy CPU per request relative to the workers %s\n", "", w
      if (has_base) {
        printf "%-24s base/nginx: throughput %s  p99 %s  CPU rel. workers %s\n", "", ratios(e, "rps", "base", "nginx"), ratios(e, "p99", "base", "nginx"), ratios(e, "cpun", "base", "nginx")
        printf "%-24s taskd/base: throughput %s  p99 %s  CPU rel. workers %s\n", "", ratios(e, "rps", "taskd", "base"), ratios(e, "p99", "taskd", "base"), ratios(e, "cpun", "taskd", "base")
      }
    }
    printf "\nbest run of each (highest req/s):\n"
    printf "%-24s %-6s %12s %10s %10s\n", "endpoint", "proxy", "req/s", "p50", "p99"
    for (i = 1; i <= n; i++) {
      e = order[i]
      for (j = 1; j <= 2; j++) {
        p = (j == 1) ? "nginx" : "taskd"
        printf "%-24s %-6s %12.0f %8.2fms %8.2fms\n", e, p, rps[e SUBSEP p], p50[e SUBSEP p], p99[e SUBSEP p]
      }
      printf "%-24s %-6s throughput %.2fx   p99 %.2fx\n", e, "taskd/nginx",
        rps[e SUBSEP "taskd"] / rps[e SUBSEP "nginx"], p99[e SUBSEP "taskd"] / p99[e SUBSEP "nginx"]
    }
  }' "$RESULTS" | tee "$OUT/summary.txt"

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
nginx_rss=$(rss_kib "$NGINX_PID")
nginx_procs=1
for child in $(pgrep -P "$NGINX_PID" || true); do
  nginx_rss=$((nginx_rss + $(rss_kib "$child")))
  nginx_procs=$((nginx_procs + 1))
done
taskd_rss=$(rss_kib "$TASKD_PID")
taskd_hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$TASKD_PID/status")
{
  echo
  printf 'memory after the runs: nginx %d MiB RSS (%d processes, summed)   taskd proxy %d MiB RSS (peak %d MiB)\n' \
    $((nginx_rss / 1024)) "$nginx_procs" $((taskd_rss / 1024)) $((taskd_hwm / 1024))
} | tee -a "$OUT/summary.txt"
echo "wrk output and logs: $OUT"
[ "$FAILED_RUNS" = 0 ] || die "$FAILED_RUNS load runs had errors or non-2xx answers"
