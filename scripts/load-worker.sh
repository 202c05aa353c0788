#!/usr/bin/env bash
# Load run against one worker, then its memory: the "worker RSS < 50 MiB after a load run"
# target of docs/contract.md §7. Targets 127.0.0.1 only; bounded by DURATION per phase.
#
#   bash scripts/load-worker.sh        (DURATION=20 CONNECTIONS=64 PORT=3960 to change)
#
# Phases, each with wrk at 64 keep-alive connections: a 20-task page of GET /api/v1/tasks,
# GET /api/v1/tasks/{id}, and a mixed phase that also creates and updates tasks.
# Prints req/s and latency per phase and the worker's RSS (VmRSS) and peak (VmHWM) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-20}
CONNECTIONS=${CONNECTIONS:-64}
PORT=${PORT:-3960}
PG=${LOAD_PG:-postgres://postgres@127.0.0.1:5432}
DB=taskd_load
OUT=${LOAD_OUT:-target/load-worker}
mkdir -p "$OUT"

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
if [ -z "${TASKD_BIN:-}" ]; then cargo build --profile dist -q; fi
BIN=${TASKD_BIN:-target/dist/taskd}

psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
export DATABASE_URL="$PG/$DB" TASKD_REDIS__KEY_PREFIX="load:$$:" TASKD_AUTH__ACCESS_TTL=1h \
  TASKD_RATE_LIMIT__ENABLED=false
$BIN --log-level warn worker --host 127.0.0.1 --port "$PORT" >"$OUT/worker.log" 2>&1 &
WORKER=$!
trap 'kill $WORKER 2>/dev/null || true; wait $WORKER 2>/dev/null || true' EXIT
BASE="http://127.0.0.1:$PORT/api/v1"
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$PORT/health/ready" >/dev/null && break; sleep 0.2; done

TOKEN=$(curl -fs -X POST "$BASE/auth/register" -H 'Content-Type: application/json' \
  -d '{"email":"load@example.com","password":"load-password","name":"Load"}' | jq -r .accessToken)
for i in $(seq 1 200); do
  curl -fs -X POST "$BASE/tasks" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    -d "{\"title\":\"Load task $i report\",\"priority\":\"high\",\"description\":\"seeded for the load run\"}" >/dev/null
done
TASK=$(curl -fs "$BASE/tasks?limit=1" -H "Authorization: Bearer $TOKEN" | jq -r '.data[0].id')

cat >"$OUT/mixed.lua" <<LUA
local n = 0
request = function()
  n = n + 1
  local h = { ["Authorization"] = "Bearer $TOKEN", ["Content-Type"] = "application/json" }
  if n % 10 == 0 then
    return wrk.format("POST", "/api/v1/tasks", h, '{"title":"written under load"}')
  elseif n % 10 == 5 then
    return wrk.format("PATCH", "/api/v1/tasks/$TASK", h, '{"status":"in_progress"}')
  end
  return wrk.format("GET", "/api/v1/tasks?limit=20&sort=-priority,dueAt", h)
end
LUA

rss() { awk '/^VmRSS|^VmHWM/ {printf "%s %d MiB  ", $1, $2/1024}' "/proc/$WORKER/status"; echo; }
echo "worker RSS before load: $(rss)"
run() {
  local label=$1; shift
  echo "--- $label ($CONNECTIONS connections, ${DURATION}s)"
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$@" | grep -E 'Requests/sec|Latency  |50%|99%|Non-2xx|Socket errors'
}
run "GET /api/v1/tasks (20-task page)" -H "Authorization: Bearer $TOKEN" "$BASE/tasks?limit=20"
run "GET /api/v1/tasks/{id}" -H "Authorization: Bearer $TOKEN" "$BASE/tasks/$TASK"
run "mixed: 80% list, 10% create, 10% update" -s "$OUT/mixed.lua" "http://127.0.0.1:$PORT"
echo "worker RSS after load: $(rss)"
