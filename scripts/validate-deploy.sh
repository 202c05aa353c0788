#!/usr/bin/env bash
# Validates deploy/ offline; CI runs it from .ci/run before the tests.
#
# - Kubernetes: every manifest under deploy/k8s/ (the example Secret too) against the schemas
#   that kubernetes-validate ships, strictly (an unknown field fails, not only a wrong type), for
#   the oldest Kubernetes the manifests support and the newest the tool knows. kubernetes-validate
#   is installed from PyPI into a virtualenv under target/ when missing.
# - systemd: the units of deploy/systemd/ and their drop-ins, installed into a scratch root,
#   through `systemd-analyze verify` (any message fails: it reports a bad value or an unknown key
#   yet exits 0) and `systemd-analyze security`, whose exposure score must stay "OK": 2.0 or
#   less (`--threshold` counts tenths).
#
# What these schemas cannot see (probe paths, ports, flags and keys matching the binary) is
# tests/deploy.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE=1.37.0
# 1.30 is the first Kubernetes with the preStop `sleep` action on by default (40-proxy.yaml);
# validate against a supported release above it and the newest the schemas cover.
K8S_VERSIONS=${K8S_VERSIONS:-"1.33.0 1.37.0"}
VENV=target/deploy-venv

log() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

kv=$VENV/bin/kubernetes-validate
if ! "$kv" --version 2>/dev/null | grep -qF "$KUBERNETES_VALIDATE"; then
  log "installing kubernetes-validate $KUBERNETES_VALIDATE into $VENV"
  # Debian's python3 makes venvs only with python3-venv installed.
  if ! python3 -m venv --clear "$VENV" >/dev/null 2>&1; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv --clear "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE"
fi

mapfile -t manifests < <(find deploy/k8s -name '*.yaml' | sort)
[ "${#manifests[@]}" -gt 0 ] || { echo "no manifests under deploy/k8s" >&2; exit 1; }
for version in $K8S_VERSIONS; do
  log "kubernetes-validate --strict, Kubernetes $version: ${#manifests[@]} files"
  "$kv" --strict --quiet --kubernetes-version "$version" "${manifests[@]}"
  echo "all valid"
done

# What checking the units needs: under CI=true it is installed, elsewhere its absence skips them.
need_for_units() { # need_for_units PACKAGE WHAT
  if [ "${CI:-}" = true ]; then
    log "installing $1 (for $2)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$1" >/dev/null
  else
    log "$2 missing: the systemd units are NOT checked (apt-get install $1)"
    exit 0
  fi
}
# The systemd package installs unit files and tools; it starts nothing in a container.
command -v systemd-analyze >/dev/null 2>&1 || need_for_units systemd systemd-analyze
# ExecReload runs /bin/kill, from procps: on every Debian and Ubuntu host, not in every container.
[ -x /bin/kill ] || need_for_units procps /bin/kill

# A scratch root: systemd's own units, these units with their drop-ins, the files they name.
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/lib/systemd" "$root/etc/systemd/system" "$root/usr/local/bin" "$root/etc/taskd" \
  "$root/usr/bin"
ln -s usr/bin "$root/bin"
cp "$(readlink -f /bin/kill)" "$root/usr/bin/kill"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp -a deploy/systemd/*.service deploy/systemd/*.service.d "$root/etc/systemd/system/"
printf '#!/bin/sh\n' >"$root/usr/local/bin/taskd"
chmod 755 "$root/usr/local/bin/taskd"
touch "$root/etc/taskd/config.toml" "$root/etc/taskd/worker.env" "$root/etc/taskd/proxy.env"

failed=0
for unit in deploy/systemd/*.service; do
  name=$(basename "$unit")
  log "systemd-analyze verify $name (with its drop-ins)"
  messages=$(systemd-analyze verify --man=no --root="$root" "$root/etc/systemd/system/$name" 2>&1) ||
    failed=1
  if [ -n "$messages" ]; then
    printf '%s\n' "$messages"
    failed=1
  else
    echo "no findings"
  fi
  log "systemd-analyze security $name"
  if ! systemd-analyze security --offline=true --root="$root" --threshold=20 \
    "$root/etc/systemd/system/$name" 2>&1 | tail -n 1; then
    echo "exposure above 2.0"
    failed=1
  fi
done
exit "$failed"
