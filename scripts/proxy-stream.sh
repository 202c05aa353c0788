#!/usr/bin/env bash
# Streams a 1 GiB body through `taskd proxy` in each direction and reports the proxy's peak RSS
# (sampled every 50 ms from /proc). 127.0.0.1 only; bounded (two transfers, 120 s cap each).
#
#   bash scripts/proxy-stream.sh            # SIZE=1G PORT=19600 knobs
#
# The upstream is a few lines of Python (http.server, HTTP/1.1): GET /big sends SIZE bytes,
# PUT /sink reads the whole body and answers its length. Exits 1 when a transfer is short or
# the proxy's peak RSS reaches 30 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-1G}
PORT=${PORT:-19600}
UP_PORT=$((PORT + 1))
ADMIN_PORT=$((PORT + 2))
LIMIT_KIB=$((30 * 1024))
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

[ -n "${TASKD_BIN:-}" ] || cargo build --profile dist -q --bin taskd
BIN=${TASKD_BIN:-target/dist/taskd}
truncate -s "$SIZE" "$TMP/big"
BYTES=$(stat -c %s "$TMP/big")

cat > "$TMP/upstream.py" <<'PY'
import http.server, os, sys
BIG = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path.startswith("/health"):
            self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
            self.wfile.write(b"ok"); return
        size = os.path.getsize(BIG)
        self.send_response(200); self.send_header("Content-Length", str(size)); self.end_headers()
        with open(BIG, "rb") as f:
            while chunk := f.read(1 << 20):
                self.wfile.write(chunk)
    def do_PUT(self):
        left, total = int(self.headers.get("Content-Length", "0")), 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk: break
            left -= len(chunk); total += len(chunk)
        body = str(total).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$TMP/upstream.py" "$UP_PORT" "$TMP/big" & PIDS+=($!)
"$BIN" proxy --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
  --upstream "http://127.0.0.1:$UP_PORT" --log-level warn > "$TMP/proxy.log" 2>&1 & PROXY=$!
PIDS+=("$PROXY")
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$PORT/health" > /dev/null 2>&1 && break
  sleep 0.1
done

# Samples the proxy's RSS until the marker file appears; prints the peak in KiB.
sample() {
  local peak=0 rss
  while [ ! -e "$TMP/done" ]; do
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$PROXY/status")
    [ "$rss" -gt "$peak" ] && peak=$rss
    sleep 0.05
  done
  echo "$peak"
}

status=0
run() { # name, curl args...
  local name=$1; shift
  rm -f "$TMP/done"
  sample > "$TMP/peak" &
  local sampler=$! start end got
  start=$(date +%s.%N)
  got=$(curl -s --max-time 120 "$@")
  end=$(date +%s.%N)
  touch "$TMP/done"; wait "$sampler"
  local peak secs
  peak=$(cat "$TMP/peak"); secs=$(echo "$end - $start" | bc)
  printf '%-9s %12s bytes of %s in %6.2f s (%5.0f MiB/s), proxy peak RSS %5.1f MiB\n' \
    "$name" "$got" "$BYTES" "$secs" "$(echo "$BYTES / 1048576 / $secs" | bc -l)" \
    "$(echo "$peak / 1024" | bc -l)"
  [ "$got" = "$BYTES" ] || { echo "  short transfer" >&2; status=1; }
  [ "$peak" -lt "$LIMIT_KIB" ] || { echo "  RSS over 30 MiB" >&2; status=1; }
}
echo "idle: proxy RSS $(awk '/VmRSS/ {print $2}' "/proc/$PROXY/status") KiB"
run download -o /dev/null -w '%{size_download}' "http://127.0.0.1:$PORT/big"
run upload -T "$TMP/big" "http://127.0.0.1:$PORT/sink"
exit $status
