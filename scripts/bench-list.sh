#!/usr/bin/env bash
# Uncached task-listing benchmark (docs/contract.md §7, "uncached list"):
#   1 000 000 tasks, 10 000 of them owned by the user asking; filtered, sorted and searched first
#   pages must answer with p95 < 20 ms on a 2-core machine, and the plans must use indexes.
#
# What it does, every step bounded in time and talking to 127.0.0.1 only:
#   1. cargo build --profile dist
#   2. migrates a dedicated database (default taskd_bench) and seeds it with
#      `taskd seed --users 100 --tasks-per-user 10000` unless it already holds that data;
#   3. starts one `taskd worker` (cache and rate limits off when the build has them, log level
#      warn), logs in as seed-0@example.com, and for each representative query runs a short
#      fixed load with wrk in three modes: page (with its count), cursor first page, and cursor
#      next page; prints req/s, p50, p95, p99;
#   4. restarts the worker with SQL statement logging, captures the exact SQL each query runs,
#      and writes EXPLAIN (ANALYZE, BUFFERS) of it (prepared and executed 5 times first, so the
#      plan is the one a pooled connection really uses: custom or generic) plus a one-line
#      summary per statement (indexes used, seq scans, rows sorted);
#   5. stops the worker (also on error or Ctrl-C) and exits non-zero when any p95 >= the target.
#
# Usage: scripts/bench-list.sh            (from anywhere; results under target/bench-list/<time>/)
# Environment (all optional):
#   DATABASE_URL          default postgres://postgres@127.0.0.1:5432/taskd_bench (must be local;
#                         a database whose name contains "bench" is dropped and re-seeded when
#                         its applied migrations no longer match the binary's)
#   BENCH_USERS=100 BENCH_TASKS_PER_USER=10000   the data set
#   BENCH_PORT=3990       first port tried for the worker (the next free one up to +20 is used)
#   BENCH_DURATION=5      seconds of load per query and mode (after BENCH_WARMUP=1 s of warm-up)
#   BENCH_CONNECTIONS=4 BENCH_THREADS=2          wrk connections and threads
#   BENCH_P95_MS=20       the target; any p95 at or above it fails the run
#   BENCH_OUT=DIR         output directory
#   BENCH_SKIP_BUILD=1    use the existing binary; BENCH_BIN=path picks another binary
#   BENCH_EXPLAIN=0       skip the EXPLAIN step
#   BENCH_ONLY=a,b        run only these queries (names as in the table)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/taskd_bench}
USERS=${BENCH_USERS:-100}
TASKS_PER_USER=${BENCH_TASKS_PER_USER:-10000}
PORT=${BENCH_PORT:-3990}
DURATION=${BENCH_DURATION:-5}
WARMUP=${BENCH_WARMUP:-1}
CONNECTIONS=${BENCH_CONNECTIONS:-4}
THREADS=${BENCH_THREADS:-2}
P95_MS=${BENCH_P95_MS:-20}
OUT=${BENCH_OUT:-target/bench-list/$(date -u +%Y%m%dT%H%M%SZ)}
BIN=${BENCH_BIN:-target/dist/taskd}
EMAIL=seed-0@example.com
PASSWORD=seed-password

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'bench-list: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Preconditions: local database only, tools present.
db_host=$(sed -E 's#^[a-z]+://([^@/]*@)?(\[[^]]*\]|[^:/?]*).*#\2#' <<<"$DATABASE_URL")
case "$db_host" in
    127.0.0.1 | localhost | "[::1]") ;;
    *) die "DATABASE_URL must point at 127.0.0.1 (got host '$db_host')" ;;
esac
db_name=$(sed -E 's#^[^/]*//[^/]*/([^?]*).*#\1#' <<<"$DATABASE_URL")
[[ -n "$db_name" && "$db_name" != "$DATABASE_URL" ]] || die "DATABASE_URL names no database"
admin_url=$(sed -E "s#^([^/]*//[^/]*/)[^?]*#\1postgres#" <<<"$DATABASE_URL")

need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v jq >/dev/null || need_apt+=(jq)
command -v psql >/dev/null || need_apt+=(postgresql-client)
command -v curl >/dev/null || need_apt+=(curl)
if ((${#need_apt[@]})); then
    log "installing ${need_apt[*]} (apt-get)"
    sudo=""
    ((EUID == 0)) || sudo="sudo"
    timeout 300 $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null 2>&1 ||
        { timeout 300 $sudo apt-get update -qq >/dev/null && timeout 300 $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null; } ||
        die "could not install ${need_apt[*]}; install them and re-run"
fi

mkdir -p "$OUT/responses"
OUT=$(cd "$OUT" && pwd)
# Every psql statement is bounded too (only psql's: the worker sets its own statement_timeout).
PSQL=(timeout 300 env PGOPTIONS="-c statement_timeout=120s" psql "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1)
PSQL_ADMIN=(timeout 300 env PGOPTIONS="-c statement_timeout=120s" psql "$admin_url" -X -q -v ON_ERROR_STOP=1)
"${PSQL_ADMIN[@]}" -Atc 'SELECT 1' >/dev/null || die "PostgreSQL does not answer at $admin_url"

# ---------------------------------------------------------------------------------------------
# 1. Build.
if [[ "${BENCH_SKIP_BUILD:-0}" != 1 && -z "${BENCH_BIN:-}" ]]; then
    log "cargo build --profile dist"
    timeout 3600 cargo build --profile dist --quiet
fi
[[ -x "$BIN" ]] || die "no binary at $BIN"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
# Built-in defaults plus the environment below, whatever ./config.toml says.
: >"$OUT/empty.toml"

# ---------------------------------------------------------------------------------------------
# 2. Database: migrate (re-create on migration drift), seed unless already seeded.
log "migrating $db_name"
if ! timeout 300 "$BIN" --config "$OUT/empty.toml" --log-level warn migrate >"$OUT/migrate.log" 2>&1; then
    if grep -qE 'previously applied but (has been modified|is missing)' "$OUT/migrate.log" &&
        [[ "$db_name" == *bench* ]]; then
        log "the migrations of $db_name changed since it was seeded: dropping and re-seeding it"
        "${PSQL_ADMIN[@]}" -c "DROP DATABASE IF EXISTS \"$db_name\" WITH (FORCE)"
        timeout 300 "$BIN" --config "$OUT/empty.toml" --log-level warn migrate >"$OUT/migrate.log" 2>&1 ||
            { cat "$OUT/migrate.log" >&2; die "migration failed"; }
    else
        cat "$OUT/migrate.log" >&2
        die "migration failed"
    fi
fi

seed_users_sql="SELECT u.id, count(t.id) AS tasks FROM users u LEFT JOIN tasks t ON t.owner_id = u.id
                WHERE u.email ~ '^seed-[0-9]+@example\.com$'
                  AND substring(u.email FROM '^seed-([0-9]+)@')::int < $USERS GROUP BY u.id"
complete=$("${PSQL[@]}" -Atc "SELECT count(*) FROM ($seed_users_sql) s WHERE tasks >= $TASKS_PER_USER")
seed_seconds="(already seeded)"
if ((complete < USERS)); then
    # A seed cut short leaves a user with part of its tasks: remove those and seed the rest.
    "${PSQL[@]}" -c "DELETE FROM users WHERE id IN (SELECT id FROM ($seed_users_sql) s WHERE tasks < $TASKS_PER_USER)"
    log "seeding: $USERS users x $TASKS_PER_USER tasks ($complete users already complete)"
    started=$(date +%s.%N)
    timeout 3600 "$BIN" --config "$OUT/empty.toml" --log-level "info,sqlx=error" seed --users "$USERS" --tasks-per-user "$TASKS_PER_USER" \
        2>&1 | tee "$OUT/seed.log" >&2
    seed_seconds=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s", b - a }')
    log "seeded in $seed_seconds"
fi
total_rows=$("${PSQL[@]}" -Atc "SELECT count(*) FROM tasks")

# ---------------------------------------------------------------------------------------------
# 3. Worker.
WORKER_PID=""
stop_worker() {
    if [[ -n "$WORKER_PID" ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
        kill -TERM "$WORKER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$WORKER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$WORKER_PID" 2>/dev/null || true
        wait "$WORKER_PID" 2>/dev/null || true
    fi
    WORKER_PID=""
}
trap stop_worker EXIT
trap 'stop_worker; exit 130' INT TERM

port_free() { [[ -z "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]; }
for ((p = PORT; p <= PORT + 20; p++)); do
    if port_free "$p"; then PORT=$p; break; fi
    ((p < PORT + 20)) || die "no free port in $PORT..$((PORT + 20))"
done
BASE=http://127.0.0.1:$PORT

# The benchmark is of the uncached path: switch the cache and rate limits off when this build
# knows those settings (unknown keys are rejected, so probe first).
worker_env=(DATABASE_URL="$DATABASE_URL" TASKD_AUTH__ACCESS_TTL=1h)
for setting in TASKD_CACHE__ENABLED=false TASKD_RATE_LIMIT__ENABLED=false; do
    if env "${worker_env[@]}" "$setting" "$BIN" --config "$OUT/empty.toml" config >/dev/null 2>&1; then
        worker_env+=("$setting")
    fi
done

start_worker() { # start_worker LOGFILE EXTRA_FLAGS...
    local logfile=$1
    shift
    env "${worker_env[@]}" "$BIN" --config "$OUT/empty.toml" "$@" worker --host 127.0.0.1 --port "$PORT" \
        --instance-id bench-list >"$logfile" 2>&1 &
    WORKER_PID=$!
    for _ in $(seq 300); do
        kill -0 "$WORKER_PID" 2>/dev/null || { tail -20 "$logfile" >&2; die "the worker exited"; }
        curl -fsS --max-time 1 "$BASE/health/ready" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "the worker was not ready within 60 s"
}

log "starting taskd worker on $BASE (${worker_env[*]:1})"
start_worker "$OUT/worker.log" --log-level warn

api() { curl -sS --max-time 10 -H "Authorization: Bearer $TOKEN" "$@"; }
TOKEN=$(curl -sS --max-time 10 -H 'content-type: application/json' \
    -d "{\"email\":\"$EMAIL\",\"password\":\"$PASSWORD\"}" "$BASE/api/v1/auth/login" | jq -r '.accessToken // empty')
[[ -n "$TOKEN" ]] || die "login as $EMAIL failed"
OWNER=$(api "$BASE/api/v1/me" | jq -r '.id')
CATEGORY=$(api "$BASE/api/v1/categories?limit=100" | jq -r '[.data[] | select(.name == "Work") | .id][0] // empty')
[[ -n "$CATEGORY" ]] || die "$EMAIL has no category named Work"
owner_tasks=$("${PSQL[@]}" -Atc "SELECT count(*) FROM tasks WHERE owner_id = '$OWNER'")
# A 30-day due window a few months before the newest seeded task: a few hundred of the user's tasks.
read -r DUE_AFTER DUE_BEFORE < <("${PSQL[@]}" -Atc "
    SELECT to_char((max(created_at) - interval '120 days') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
           to_char((max(created_at) - interval '90 days') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
    FROM tasks WHERE owner_id = '$OWNER'" | tr '|' ' ')

# The representative queries: name, query string, and the same filter as store::tasks::list
# binds it (for EXPLAIN): status, priority ranks, category, dueBefore, dueAfter, tsquery (the
# words as prefixes, tested on `search`) and the words (for the owner-tagged GIN terms), sort.
NAMES=(default status-sort search search-status-due priority-category-title due-window)
declare -A QS SQL_STATUS SQL_PRIORITY SQL_CATEGORY SQL_BEFORE SQL_AFTER SQL_TSQUERY SQL_WORDS SORT
for n in "${NAMES[@]}"; do
    SQL_STATUS[$n]="" SQL_PRIORITY[$n]="" SQL_CATEGORY[$n]="" SQL_BEFORE[$n]="" SQL_AFTER[$n]=""
    SQL_TSQUERY[$n]="" SQL_WORDS[$n]="" SORT[$n]="-createdAt"
done
QS[default]=""
QS[status-sort]="status=pending,in_progress&sort=-priority,dueAt"
SQL_STATUS[status-sort]="{pending,in_progress}" SORT[status-sort]="-priority,dueAt"
QS[search]="search=report"
SQL_TSQUERY[search]="report:*" SQL_WORDS[search]="{report}"
QS[search-status-due]="search=deploy%20server&status=pending&sort=dueAt"
SQL_STATUS[search-status-due]="{pending}" SQL_TSQUERY[search-status-due]="deploy:* & server:*"
SQL_WORDS[search-status-due]="{deploy,server}" SORT[search-status-due]="dueAt"
QS[priority-category-title]="priority=high,urgent&categoryId=$CATEGORY&sort=title"
SQL_PRIORITY[priority-category-title]="{2,3}" SQL_CATEGORY[priority-category-title]=$CATEGORY SORT[priority-category-title]="title"
QS[due-window]="dueAfter=$DUE_AFTER&dueBefore=$DUE_BEFORE&sort=dueAt"
SQL_BEFORE[due-window]=$DUE_BEFORE SQL_AFTER[due-window]=$DUE_AFTER SORT[due-window]="dueAt"
MODES=(page cursor cursor-next)
if [[ -n "${BENCH_ONLY:-}" ]]; then
    IFS=, read -r -a NAMES <<<"$BENCH_ONLY"
    for n in "${NAMES[@]}"; do [[ -v "QS[$n]" ]] || die "BENCH_ONLY: no query named $n"; done
fi

url_of() { # url_of NAME MODE
    local qs=${QS[$1]} mode=$2
    case $mode in
        page) ;;
        cursor) qs="${qs:+$qs&}cursor=" ;;
        cursor-next) qs="${qs:+$qs&}cursor=${NEXT[$1]}" ;;
    esac
    printf '%s/api/v1/tasks%s' "$BASE" "${qs:+?$qs}"
}

# Check every request answers 200 with a full page, and get each query's second cursor page.
declare -A NEXT INFO
for n in "${NAMES[@]}"; do
    for mode in "${MODES[@]}"; do
        f="$OUT/responses/$n.$mode.json"
        code=$(api -D "$f.headers" -o "$f" -w '%{http_code}' "$(url_of "$n" "$mode")")
        # Asked twice: an answer from the cache would not measure PostgreSQL.
        api -D "$f.headers" -o /dev/null "$(url_of "$n" "$mode")"
        if grep -qi '^x-cache: *hit' "$f.headers"; then
            die "responses come from the cache: this build has no TASKD_CACHE__ENABLED switch?"
        fi
        [[ "$code" == 200 ]] || { cat "$f" >&2; die "$n ($mode) answered $code"; }
        rows=$(jq '.data | length' "$f")
        case $mode in
            page) INFO[$n.$mode]="rows=$rows total=$(jq '.pagination.total' "$f")" ;;
            cursor)
                NEXT[$n]=$(jq -r '.pagination.nextCursor // empty' "$f")
                [[ -n "${NEXT[$n]}" ]] || die "$n: no nextCursor on the first cursor page"
                INFO[$n.$mode]="rows=$rows hasMore=$(jq '.pagination.hasMore' "$f")" ;;
            cursor-next) INFO[$n.$mode]="rows=$rows hasMore=$(jq '.pagination.hasMore' "$f")" ;;
        esac
    done
done

cat >"$OUT/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %.6f %.3f %.3f %.3f %.3f %d %d\n",
    summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000,
    e.status, e.connect + e.read + e.write + e.timeout))
end
LUA

log "load: wrk -t$THREADS -c$CONNECTIONS, ${WARMUP}s warm-up + ${DURATION}s per query and mode; load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf 'query\tmode\treq_s\tp50_ms\tp95_ms\tp99_ms\tmax_ms\tnon2xx\terrors\trows\n' >"$OUT/results.tsv"
failed=0
for n in "${NAMES[@]}"; do
    for mode in "${MODES[@]}"; do
        url=$(url_of "$n" "$mode")
        wrk_args=(-t"$THREADS" -c"$CONNECTIONS" --timeout 5s -s "$OUT/report.lua" -H "Authorization: Bearer $TOKEN")
        if ((WARMUP > 0)); then
            timeout $((WARMUP + 30)) wrk "${wrk_args[@]}" -d"${WARMUP}s" "$url" >/dev/null
        fi
        line=$(timeout $((DURATION + 30)) wrk "${wrk_args[@]}" -d"${DURATION}s" "$url" | tee "$OUT/wrk.$n.$mode.txt" | grep '^BENCH ') ||
            die "wrk failed for $n ($mode)"
        read -r _ reqs secs p50 p95 p99 max non2xx errs <<<"$line"
        rps=$(awk -v r="$reqs" -v s="$secs" 'BEGIN { printf "%.0f", r / s }')
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$mode" "$rps" "$p50" "$p95" "$p99" "$max" \
            "$non2xx" "$errs" "${INFO[$n.$mode]}" >>"$OUT/results.tsv"
        if awk -v p="$p95" -v t="$P95_MS" 'BEGIN { exit !(p >= t) }' || ((non2xx > 0 || errs > 0 || reqs == 0)); then
            failed=1
        fi
    done
done
stop_worker

# ---------------------------------------------------------------------------------------------
# 4. EXPLAIN the exact statements the worker runs.
: >"$OUT/explain.txt"
: >"$OUT/explain-summary.txt"
if [[ "${BENCH_EXPLAIN:-1}" != 0 ]]; then
    log "capturing SQL and writing EXPLAIN (ANALYZE, BUFFERS)"
    start_worker "$OUT/capture.log" --log-format json --log-level 'warn,sqlx::query=trace'

    # SQL literal of a string.
    lit() { printf "'%s'" "${1//\'/\'\'}"; }
    # The bind parameters of the statements store::tasks::list runs, in order, as
    # "type<TAB>literal" lines. A mismatch with the captured SQL is reported, not guessed at.
    filter_params() { # filter_params NAME indexed|plain
        local n=$1
        [[ -z "${SQL_STATUS[$n]}" ]] || printf 'text[]\t%s\n' "$(lit "${SQL_STATUS[$n]}")"
        [[ -z "${SQL_PRIORITY[$n]}" ]] || printf 'smallint[]\t%s\n' "$(lit "${SQL_PRIORITY[$n]}")"
        [[ -z "${SQL_CATEGORY[$n]}" ]] || printf 'uuid\t%s\n' "$(lit "${SQL_CATEGORY[$n]}")"
        [[ -z "${SQL_BEFORE[$n]}" ]] || printf 'timestamptz\t%s\n' "$(lit "${SQL_BEFORE[$n]}")"
        [[ -z "${SQL_AFTER[$n]}" ]] || printf 'timestamptz\t%s\n' "$(lit "${SQL_AFTER[$n]}")"
        [[ -n "${SQL_TSQUERY[$n]}" ]] || return 0
        # The words: tested on `search` itself (plain), or with the owner through the GIN
        # index's owner-tagged terms (indexed).
        if [[ "$2" == indexed ]]; then
            printf 'uuid\t%s\ntext[]\t%s\n' "$(lit "$OWNER")" "$(lit "${SQL_WORDS[$n]}")"
        else
            printf 'text\t%s\n' "$(lit "${SQL_TSQUERY[$n]}")"
        fi
    }
    cursor_params() { # cursor_params NAME: the keyset condition of listing::push_after
        local n=$1 raw=${NEXT[$1]} json types=() values=() descs=() keys i j uniform=1 id
        raw=$(tr '_-' '/+' <<<"$raw")
        while ((${#raw} % 4)); do raw+="="; done
        json=$(base64 -d <<<"$raw")
        IFS=, read -r -a keys <<<"${SORT[$n]}"
        for ((i = 0; i < ${#keys[@]}; i++)); do
            local key=${keys[$i]} desc=0
            [[ "$key" != -* ]] || { desc=1; key=${key#-}; }
            descs+=("$desc")
            case $key in
                createdAt | updatedAt | dueAt) types+=(timestamptz) ;;
                priority) types+=(smallint) ;;
                title) types+=(text) ;;
            esac
            if [[ $(jq ".v[$i] == null" <<<"$json") == true ]]; then
                values+=(NULL)
            else
                values+=("$(lit "$(jq -r ".v[$i] | tostring" <<<"$json")")")
            fi
        done
        id=$(lit "$(jq -r '.i' <<<"$json")")
        for d in "${descs[@]}"; do [[ "$d" == "${descs[-1]}" ]] || uniform=0; done
        if ((uniform)); then
            # (k1, k2, id) > (v1, v2, v)
            for ((i = 0; i < ${#keys[@]}; i++)); do printf '%s\t%s\n' "${types[$i]}" "${values[$i]}"; done
        else
            # (k1 > v1) OR (k1 = v1 AND k2 > v2) OR ... OR (all equal AND id > v): each term
            # binds its values anew.
            for ((i = 0; i <= ${#keys[@]}; i++)); do
                for ((j = 0; j < i && j < ${#keys[@]}; j++)); do printf '%s\t%s\n' "${types[$j]}" "${values[$j]}"; done
                ((i == ${#keys[@]})) || printf '%s\t%s\n' "${types[$i]}" "${values[$i]}"
            done
        fi
        printf 'uuid\t%s\n' "$id"
    }
    params_of() { # params_of NAME MODE KIND(select|count|walk)
        local n=$1 mode=$2 kind=$3 fetch=21
        [[ "$mode" != page ]] || fetch=20
        printf 'uuid\t%s\n' "$(lit "$OWNER")"
        case $kind in
            count) filter_params "$n" indexed ;;
            select)
                filter_params "$n" indexed
                [[ "$mode" != cursor-next ]] || cursor_params "$n"
                # LIMIT: one row more than the page in cursor mode; OFFSET in page mode.
                printf 'int8\t%s\n' "$fetch"
                [[ "$mode" != page ]] || printf 'int8\t0\n'
                ;;
            walk)
                # Sort-index rows walked (WALK_PER_ROW per row wanted), then the filters on them.
                [[ "$mode" != cursor-next ]] || cursor_params "$n"
                printf 'int8\t%s\n' "$((fetch * 25))"
                filter_params "$n" plain
                printf 'int8\t%s\n' "$fetch"
                ;;
        esac
    }

    summarize() { # JSON plan on stdin -> one-line summary
        jq -r '
          def nodes: recurse(.Plans[]?);
          .[0] as $top | [$top.Plan | nodes] as $all
          | ([$all[] | select(."Index Name") | ."Index Name"] | unique) as $idx
          | ([$all[] | select(."Node Type" == "Seq Scan") | ."Relation Name"] | unique) as $seq
          | ([$all[] | select(."Node Type" | test("Sort$")) | .Plans[0]["Actual Rows"] * .Plans[0]["Actual Loops"]] ) as $sorted
          | "index=\(if ($idx | length) > 0 then $idx | join(",") else "NONE" end)"
            + (if ($seq | length) > 0 then "  SEQ SCAN on \($seq | join(","))" else "" end)
            + (if ($sorted | length) > 0 then "  sorted \($sorted | map(tostring) | join("+")) rows" else "  no sort" end)
            + "  \($top."Execution Time" | . * 100 | round / 100) ms"'
    }

    for n in "${NAMES[@]}"; do
        for mode in "${MODES[@]}"; do
            before=$(wc -l <"$OUT/capture.log")
            api -o /dev/null "$(url_of "$n" "$mode")"
            # stderr is unbuffered: the statements are logged once the response is in; a page
            # runs at least two (rows and count), a search may run one more (see store::tasks).
            want=1
            [[ "$mode" != page ]] || want=2
            stmts=""
            for _ in $(seq 50); do
                sleep 0.1
                stmts=$(tail -n +"$((before + 1))" "$OUT/capture.log" |
                    jq -Rr 'fromjson? | select(.target == "sqlx::query") | ."db.statement" // empty | gsub("\\s+"; " ") | ltrimstr(" ") | rtrimstr(" ")' |
                    grep -E '^SELECT .* FROM tasks' || true)
                (($(grep -c . <<<"$stmts") >= want)) && break
            done
            while IFS= read -r sql; do
                [[ -n "$sql" ]] || continue
                kind=select
                [[ "$sql" != "SELECT count(*)"* ]] || kind=count
                [[ "$sql" != *") AS walk "* ]] || kind=walk
                params=$(params_of "$n" "$mode" "$kind")
                # A search page takes its total from the same scan: same parameters as a select.
                [[ "$sql" != *"count(*) OVER ()"* ]] || kind=select+total
                nparams=$(grep -c . <<<"$params")
                maxp=$(grep -oE '\$[0-9]+' <<<"$sql" | tr -d '$' | sort -n | tail -1 || true)
                label="$n $mode $kind"
                {
                    printf '=== %s\n%s\n' "$label" "$sql"
                } >>"$OUT/explain.txt"
                if [[ "${maxp:-0}" != "$nparams" ]]; then
                    printf '%-42s parameters differ from the script (%s vs %s): update params_of\n' \
                        "$label" "${maxp:-0}" "$nparams" | tee -a "$OUT/explain.txt" >>"$OUT/explain-summary.txt"
                    continue
                fi
                types=$(cut -f1 <<<"$params" | paste -sd,)
                values=$(cut -f2- <<<"$params" | paste -sd,)
                prep="PREPARE q($types) AS $sql;"
                warm=""
                for _ in 1 2 3 4 5; do warm+="EXECUTE q($values);"$'\n'; done
                plan_text=$("${PSQL[@]}" -o /dev/null -c "$prep" -c "$warm" \
                    -c '\o' -c "EXPLAIN (ANALYZE, BUFFERS) EXECUTE q($values)" 2>&1) || true
                plan_json=$("${PSQL[@]}" -At -o /dev/null -c "$prep" -c "$warm" \
                    -c '\o' -c "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE q($values)" 2>&1) || true
                printf '%s\n\n' "$plan_text" >>"$OUT/explain.txt"
                plan_kind=custom
                grep -qE '\$[0-9]' <<<"$plan_text" && plan_kind=generic
                summary=$(summarize <<<"$plan_json" 2>/dev/null) || summary="EXPLAIN failed: $(head -c 200 <<<"$plan_json")"
                printf '%-42s %s plan  %s\n' "$label" "$plan_kind" "$summary" >>"$OUT/explain-summary.txt"
            done <<<"$stmts"
        done
    done
    stop_worker
fi

# ---------------------------------------------------------------------------------------------
# 5. Report.
{
    echo "taskd list benchmark — $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty')"
    echo "machine: $(nproc) cores; PostgreSQL $("${PSQL[@]}" -Atc 'SHOW server_version'); load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "data: $total_rows tasks, $owner_tasks owned by $EMAIL; seeding: $seed_seconds"
    echo "load: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s per row, after ${WARMUP}s warm-up; target p95 < $P95_MS ms"
    echo
    column -t -s $'\t' "$OUT/results.tsv"
    if [[ -s "$OUT/explain-summary.txt" ]]; then
        echo
        echo "EXPLAIN (ANALYZE, BUFFERS) in $OUT/explain.txt:"
        cat "$OUT/explain-summary.txt"
    fi
    echo
    if ((failed)); then echo "FAIL: some p95 >= $P95_MS ms (or errors)"; else echo "OK: every p95 < $P95_MS ms"; fi
} | tee "$OUT/report.txt"
echo "results in $OUT" >&2
exit "$failed"
