#!/usr/bin/env bash
# A worker host vanishes under load: taskd proxy vs NGINX, same scenario, one after the other.
# Runs tests/multihost.rs (network namespaces: an edge host with the proxy and 16 clients doing
# GETs and keyed POSTs, two worker hosts, a database host; one worker host's switch port goes
# down for OUTAGE, then comes back) once with `taskd proxy` and once with NGINX (its defaults:
# proxy_next_upstream error timeout, proxy_read_timeout 60s, max_fails 1) in the proxy's place,
# and prints what the clients saw: requests answered, failed, the slowest.
#
#   sudo bash scripts/host-cut.sh            # OUTAGE=70s: longer than NGINX's read timeout
#   OUTAGE=6s bash scripts/host-cut.sh
#
# Needs root (namespaces), nginx (installed when missing). Traffic stays inside the test's own
# namespaces; everything is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTAGE=${OUTAGE:-70s}
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  apt-get install -y -qq nginx-light >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null; }
fi
export PATH="$PATH:/usr/sbin"
for proxy in taskd nginx; do
  MULTIHOST_PROXY=$proxy MULTIHOST_OUTAGE=$OUTAGE cargo test -q --test multihost -- --nocapture 2>&1 |
    grep -E "^(taskd|nginx): |^  (GET|POST)|panicked|test result"
done
