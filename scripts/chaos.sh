#!/usr/bin/env bash
# Chaos run of the local cluster: load through `taskd serve --instances 4` while a random worker
# is killed with `kill -9` every few seconds. Bounded in time, 127.0.0.1 only, stops by itself.
#
#   bash scripts/chaos.sh
#   CHAOS_SECONDS=30 KILL_EVERY=3 CONNECTIONS=64 POST_EVERY=5 PORT=18480 bash scripts/chaos.sh
#
# Steps: build (profile dist); fresh database `taskd_chaos`; `taskd serve --instances 4` on
# 127.0.0.1:$PORT (admin $PORT+1, workers from $PORT-80); one user registered; the load
# generator (scripts/loadgen.rs) runs GETs of /api/v1/tasks and, one request in $POST_EVERY,
# POSTs of /api/v1/tasks each with a fresh Idempotency-Key, for 2 s + $CHAOS_SECONDS + 3 s; meanwhile
# every $KILL_EVERY s a worker that is ready is killed with SIGKILL and /status is polled until
# that worker is back with a new pid and ready. Then SIGTERM to the supervisor (exit 0 expected).
#
# Reports: failures by method, kills, restarts, per-kill recovery (killed -> ready again, seen in
# /status, polled every 50 ms), latency p50/p99, supervisor RSS, and duplicates of idempotent
# POSTs (tasks in PostgreSQL vs distinct keys accepted). Exits 1 when a GET or a keyed POST
# failed, a POST was duplicated or lost, a worker took 2 s or more to come back, or the
# supervisor did not exit 0. Output files go to target/chaos/.
set -euo pipefail
cd "$(dirname "$0")/.."

CHAOS_SECONDS=${CHAOS_SECONDS:-30}
KILL_EVERY=${KILL_EVERY:-3}
CONNECTIONS=${CONNECTIONS:-64}
POST_EVERY=${POST_EVERY:-5}
PORT=${PORT:-18480}
ADMIN_PORT=$((PORT + 1))
BASE_PORT=$((PORT - 80))
PG=${CHAOS_PG:-postgres://postgres@127.0.0.1:5432}
DB=taskd_chaos
OUT=${CHAOS_OUT:-target/chaos}
mkdir -p "$OUT"

for tool in curl jq psql; do
  command -v "$tool" >/dev/null || { echo "chaos: needs $tool" >&2; exit 2; }
done
if [ -z "${TASKD_BIN:-}" ]; then
  cargo build --profile dist -q --bin taskd --example loadgen
fi
BIN=${TASKD_BIN:-target/dist/taskd}
LOADGEN=${LOADGEN_BIN:-target/dist/examples/loadgen}

psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
export DATABASE_URL="$PG/$DB" TASKD_REDIS__KEY_PREFIX="chaos:$$:" TASKD_RATE_LIMIT__ENABLED=false

ADMIN="http://127.0.0.1:$ADMIN_PORT"
API="http://127.0.0.1:$PORT"
SERVE=""
LOAD=""
cleanup() {
  [ -n "$LOAD" ] && kill "$LOAD" 2>/dev/null || true
  if [ -n "$SERVE" ] && kill -0 "$SERVE" 2>/dev/null; then
    kill -TERM "$SERVE" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVE" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVE" 2>/dev/null || true
  fi
  # The run's Redis keys (its idempotency records would stay a day in a shared keyspace).
  if command -v redis-cli >/dev/null; then
    local redis=(redis-cli -u "${REDIS_URL:-redis://127.0.0.1:6379}")
    "${redis[@]}" --scan --pattern "$TASKD_REDIS__KEY_PREFIX*" |
      xargs -r -d '\n' -n 1000 "${redis[@]}" del >/dev/null || true
  fi
}
trap cleanup EXIT

now_ms() { date +%s%3N; }

start=$(now_ms)
"$BIN" serve --instances 4 --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
  --base-port "$BASE_PORT" >"$OUT/serve.stdout" 2>"$OUT/serve.log" &
SERVE=$!
ready=""
for _ in $(seq 1 600); do
  if curl -fs "$ADMIN/status" 2>/dev/null | jq -e '[.workers[] | select(.state == "ready")] | length == 4' >/dev/null; then
    ready=$(( $(now_ms) - start )); break
  fi
  kill -0 "$SERVE" 2>/dev/null || { echo "chaos: taskd serve exited" >&2; tail -20 "$OUT/serve.log" >&2; exit 1; }
  sleep 0.02
done
[ -n "$ready" ] || { echo "chaos: workers not ready after 12 s" >&2; exit 1; }
echo "chaos: 4 workers ready ${ready} ms after start (migrations included)"

TOKEN=$(curl -fs -X POST "$API/api/v1/auth/register" -H 'Content-Type: application/json' \
  -d '{"email":"chaos@example.com","password":"chaos-password","name":"Chaos"}' | jq -r .accessToken)
LOAD_SECONDS=$((CHAOS_SECONDS + 5))
"$LOADGEN" --url "$API" --token "$TOKEN" --connections "$CONNECTIONS" \
  --duration "${LOAD_SECONDS}s" --post-every "$POST_EVERY" --accepted-keys "$OUT/accepted-keys.txt" \
  >"$OUT/load.json" &
LOAD=$!
sleep 2

echo "chaos: killing a random ready worker every ${KILL_EVERY}s for ${CHAOS_SECONDS}s under load (${CONNECTIONS} connections)"
: >"$OUT/recoveries.txt"
chaos_end=$(( $(now_ms) + CHAOS_SECONDS * 1000 ))
kills=0
while [ "$(now_ms)" -lt "$chaos_end" ]; do
  round=$(now_ms)
  victim=$(curl -fs "$ADMIN/status" | jq -r '[.workers[] | select(.state == "ready")] | .[] | "\(.id) \(.pid)"' | shuf -n 1)
  if [ -n "$victim" ]; then
    read -r id pid <<<"$victim"
    kill -9 "$pid"
    killed=$(now_ms)
    kills=$((kills + 1))
    back=""
    while [ $(( $(now_ms) - killed )) -lt $((KILL_EVERY * 1000)) ]; do
      if curl -fs "$ADMIN/status" | jq -e --arg id "$id" --argjson pid "$pid" \
        '.workers[] | select(.id == $id) | .state == "ready" and .pid != null and .pid != $pid' >/dev/null; then
        back=$(( $(now_ms) - killed )); break
      fi
      sleep 0.05
    done
    echo "$id ${back:-never}" | tee -a "$OUT/recoveries.txt" | sed 's/^/chaos:   killed /; s/ \([0-9]*\)$/ -> ready in \1 ms/'
  fi
  rest=$(( KILL_EVERY * 1000 - ($(now_ms) - round) ))
  [ "$rest" -gt 0 ] && sleep "$(awk -v ms="$rest" 'BEGIN { printf "%.3f", ms / 1000 }')"
done

wait "$LOAD"
LOAD=""
status=$(curl -fs "$ADMIN/status")
restarts=$(jq '[.workers[].restarts] | add' <<<"$status")
rss_kib=$(awk '/VmRSS/ { print $2 }' "/proc/$SERVE/status")

kill -TERM "$SERVE"
exit_code=0
wait "$SERVE" || exit_code=$?
SERVE=""

# Tasks per key in PostgreSQL against the keys the load generator saw accepted (2xx).
read -r tasks distinct duplicates lost <<<"$(psql "$PG/$DB" -qAt -F ' ' <<SQL
CREATE TEMP TABLE accepted (key text PRIMARY KEY);
\copy accepted FROM '$OUT/accepted-keys.txt'
SELECT (SELECT count(*) FROM tasks WHERE title LIKE 'chaos %'),
       (SELECT count(DISTINCT title) FROM tasks WHERE title LIKE 'chaos %'),
       (SELECT count(*) FROM (SELECT title FROM tasks WHERE title LIKE 'chaos %'
                              GROUP BY title HAVING count(*) > 1) AS twice),
       (SELECT count(*) FROM accepted a
         WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.title = 'chaos ' || a.key));
SQL
)"
accepted=$(jq '.ok.POST // 0' "$OUT/load.json")
unanswered=$((distinct - accepted + lost))
never=$(grep -c never "$OUT/recoveries.txt" || true)
max_recovery=$(awk '$2 != "never" { if ($2 > m) m = $2 } END { print m + 0 }' "$OUT/recoveries.txt")
mean_recovery=$(awk '$2 != "never" { s += $2; n++ } END { if (n) printf "%d", s / n; else print 0 }' "$OUT/recoveries.txt")

echo
echo "== chaos report ($(nproc) cores, $(date -u +%FT%TZ)) =="
jq -r '"load:        \(.requests) requests in \(.seconds) s (\(.rps) req/s) at \(.connections) connections",
       "answered:    GET \(.ok.GET // 0) ok, POST \(.ok.POST // 0) ok",
       "failed:      GET \(.failed.GET // 0), POST (with Idempotency-Key) \(.failed.POST // 0)",
       "latency ms:  p50 \(.latencyMs.p50), p90 \(.latencyMs.p90), p99 \(.latencyMs.p99), max \(.latencyMs.max)",
       (.failureSamples[] | "  failure:   \(.)")' "$OUT/load.json"
echo "kills:       $kills (kill -9), restarts in /status: $restarts"
echo "recovery:    max ${max_recovery} ms, mean ${mean_recovery} ms (killed -> ready again), never back: $never"
echo "idempotent:  $accepted POSTs accepted, $tasks tasks in PostgreSQL for $distinct distinct keys:"
echo "             keys with more than one task $duplicates, accepted keys without a task $lost,"
echo "             tasks whose POST got no 2xx (created, then the answer failed) $unanswered"
echo "             answered as replays $(jq '.replayed // 0' "$OUT/load.json") (each key is sent once: a replay is the proxy's retry"
echo "             of a POST whose worker died, finding the answer kept or the task committed)"
echo "supervisor:  RSS $((rss_kib / 1024)) MiB (proxy + supervisor, after the run); exit code $exit_code after SIGTERM"
echo "startup:     4 workers ready ${ready} ms after start"

failed_gets=$(jq '.failed.GET // 0' "$OUT/load.json")
failed_posts=$(jq '.failed.POST // 0' "$OUT/load.json")
verdict=0
[ "$failed_gets" -eq 0 ] || { echo "FAIL: $failed_gets GETs failed"; verdict=1; }
[ "$failed_posts" -eq 0 ] || { echo "FAIL: $failed_posts POSTs with Idempotency-Key failed"; verdict=1; }
[ "$duplicates" -eq 0 ] && [ "$lost" -eq 0 ] || { echo "FAIL: duplicated or lost POSTs"; verdict=1; }
[ "$never" -eq 0 ] && [ "$max_recovery" -lt 2000 ] || { echo "FAIL: a worker took 2 s or more to come back"; verdict=1; }
[ "$exit_code" -eq 0 ] || { echo "FAIL: taskd serve exited $exit_code after SIGTERM"; verdict=1; }
[ "$verdict" -eq 0 ] && echo "PASS"
exit "$verdict"
