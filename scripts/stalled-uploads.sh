#!/usr/bin/env bash
# Stalled uploads against `taskd proxy`: N clients each send the headers of a 1 MiB PUT (a
# request the proxy buffers so it can retry it) and all of the body but its last byte, then
# stop. Shows that every one is answered (408) or closed within `proxy.body_timeout` + 1 s and
# that the proxy's memory goes back down.
#
#   bash scripts/stalled-uploads.sh        (UPLOADS=30 BODY_TIMEOUT=5s to change)
#
# One release worker on 127.0.0.1:3991 (fresh database taskd_stall), the proxy on 127.0.0.1:3990;
# everything stops with the script.
set -euo pipefail
cd "$(dirname "$0")/.."

UPLOADS=${UPLOADS:-30}
BODY_TIMEOUT=${BODY_TIMEOUT:-5s}
PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
OUT=${BENCH_OUT:-target/stalled-uploads}
mkdir -p "$OUT"
if [ -z "${TASKD_BIN:-}" ]; then cargo build --profile dist -q; fi
BIN=${TASKD_BIN:-target/dist/taskd}

psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS taskd_stall WITH (FORCE)"
export DATABASE_URL="$PG/taskd_stall" TASKD_REDIS__KEY_PREFIX="stall:$$:"
$BIN --log-level warn worker --host 127.0.0.1 --port 3991 >"$OUT/worker.log" 2>&1 &
WORKER=$!
TASKD_PROXY__BODY_TIMEOUT=$BODY_TIMEOUT $BIN --log-level warn proxy --listen 127.0.0.1:3990 \
  --admin-listen 127.0.0.1:3992 --upstream http://127.0.0.1:3991 >"$OUT/proxy.log" 2>&1 &
PROXY=$!
trap 'kill $WORKER $PROXY 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -fs http://127.0.0.1:3990/health/ready >/dev/null && break; sleep 0.2; done
rss() { awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$PROXY/status"; }

echo "proxy RSS before: $(rss) MiB; body_timeout $BODY_TIMEOUT; $UPLOADS uploads of 1 MiB minus a byte"
python3 - "$UPLOADS" "$PROXY" <<'PY'
import socket, sys, time
n, proxy = int(sys.argv[1]), sys.argv[2]
def rss():
    for line in open(f"/proc/{proxy}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
body = b"x" * (1024 * 1024 - 1)
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", 3990))
    s.sendall(b"PUT /api/v1/tasks/00000000-0000-0000-0000-000000000000 HTTP/1.1\r\n"
              b"host: x\r\ncontent-type: application/json\r\ncontent-length: 1048576\r\n\r\n" + body)
    socks.append(s)
started = time.monotonic()
time.sleep(1)
print(f"all {n} stalled, 1 s later: proxy RSS {rss():.1f} MiB")
answered, ended = {}, []
for s in socks:
    s.settimeout(120)
    try:
        first = s.recv(64)
    except OSError as e:
        first = repr(e).encode()
    ended.append(time.monotonic() - started)
    answered[first[:12].decode(errors="replace") or "closed"] = answered.get(first[:12].decode(errors="replace") or "closed", 0) + 1
    s.close()
print(f"answers: {answered}; last ended {max(ended):.2f} s after the stall began")
time.sleep(1)
print(f"1 s after the last: proxy RSS {rss():.1f} MiB")
PY
