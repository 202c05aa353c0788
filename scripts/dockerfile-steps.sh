#!/usr/bin/env bash
# deploy/Dockerfile without Docker: reads the Dockerfile and carries out its instructions on this
# host, then runs the result the way the image runs it. For machines where `docker build` cannot
# run (no daemon) — and a check that the Dockerfile's steps still work.
#
#   flock /work/bench.lock bash scripts/dockerfile-steps.sh    # a full release build: minutes
#
# Build stage: the `rust:<RUST_VERSION>-bookworm` image is stood in for by this host (Debian 12,
# the same toolchain: checked), its WORKDIR by a fresh directory under target/, every COPY from
# the build context by a copy from the repository (each COPY source must be let in by
# deploy/Dockerfile.dockerignore), every RUN by `/bin/sh -c` there — the same commands, so the
# same `cargo build --profile dist --locked` from an empty target directory.
# Runtime stage: distroless cc is stood in for by a root file system holding what that image
# holds and the binary needs (glibc and libgcc only, checked against `ldd`; CA certificates;
# /etc/passwd with its "nonroot" user 65532), plus whatever the stage COPYs. The binary then runs
# in it as the Dockerfile's USER with the ENTRYPOINT, in its WORKDIR, the root file system
# mounted read-only (as readOnlyRootFilesystem does): `--version`, `config`, and `worker`
# answering /health/live and /health/ready against the local PostgreSQL and Redis, until SIGTERM
# stops it with exit 0. Needs root (mount namespace, chroot).
#
# Environment: WORK (default target/dockerfile-steps, emptied first), KEEP=1 keeps it,
# DATABASE_URL (default postgres://postgres@127.0.0.1:5432/taskd_dockerfile_steps, dropped after),
# REDIS_URL (default redis://127.0.0.1:6379).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DOCKERFILE=deploy/Dockerfile
IGNORE=deploy/Dockerfile.dockerignore
WORK=${WORK:-$REPO/target/dockerfile-steps}
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/taskd_dockerfile_steps}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'dockerfile-steps: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (a mount namespace and chroot, as a container runtime)"

rm -rf "$WORK"
mkdir -p "$WORK"
worker_pid=
cleanup() {
  if [ -n "$worker_pid" ] && kill -0 "$worker_pid" 2>/dev/null; then kill -KILL "$worker_pid"; fi
  if [ "${KEEP:-}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# The Dockerfile's instructions, one per line: continuations joined, comments dropped.
instructions() {
  sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' "$DOCKERFILE" |
    sed -e ':a' -e '/\\$/N; s/\\\n[[:space:]]*/ /; ta'
}

# A JSON array of strings (exec form) as one word per line.
json_words() { sed -e 's/^\[ *"//' -e 's/" *\]$//' -e 's/", *"/\n/g' <<<"$1"; }

# Is `path` let into the build context by the ignore file? (The file is an allow-list: `*`,
# then `!path` lines.)
in_context() {
  local path=${1%/}
  grep -qxF "!$path" "$IGNORE" || grep -qxF "!$path/" "$IGNORE"
}

declare -A ARGS=() STAGE_DIR=()
stage= stage_root= workdir=/ user= entrypoint=() cmd=() exposed=() stopsignal=SIGTERM

while IFS= read -r line; do
  keyword=${line%% *}
  rest=${line#* }
  # ${NAME} of an ARG.
  for name in "${!ARGS[@]}"; do rest=${rest//\$\{$name\}/${ARGS[$name]}}; done
  case "${keyword^^}" in
    ARG)
      name=${rest%%=*}
      ARGS[$name]=${rest#*=}
      ;;
    FROM)
      image=${rest%% *}
      stage=${rest##* [Aa][Ss] }
      [ "$stage" = "$rest" ] && stage=runtime
      stage_root=$WORK/$stage
      STAGE_DIR[$stage]=$stage_root
      workdir=/
      mkdir -p "$stage_root"
      log "FROM $image ($stage)"
      case "$image" in
        rust:*-bookworm)
          want=${image#rust:}
          want=${want%-bookworm}
          have=$(rustc --version | awk '{print $2}')
          [ "$have" = "$want" ] || die "the image pins Rust $want, this host has $have"
          grep -q 'VERSION_CODENAME=bookworm' /etc/os-release ||
            die "the builder image is Debian 12 (bookworm); this host is not"
          echo "stand-in: this host (Debian 12, rustc $have)"
          ;;
        gcr.io/distroless/cc-debian12:nonroot)
          # What distroless cc gives: /etc/passwd and /etc/group with root, nobody and nonroot
          # (65532, home /home/nonroot), CA certificates, /tmp. The libraries come below.
          mkdir -p "$stage_root"/{etc/ssl/certs,tmp,home/nonroot,usr/local/bin,proc,dev}
          chmod 1777 "$stage_root/tmp"
          printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
            'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
            'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$stage_root/etc/passwd"
          printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$stage_root/etc/group"
          chown 65532:65532 "$stage_root/home/nonroot"
          cp /etc/ssl/certs/ca-certificates.crt "$stage_root/etc/ssl/certs/"
          echo "stand-in: a root file system with distroless cc's users and CA certificates"
          ;;
        *) die "no stand-in for base image $image" ;;
      esac
      ;;
    WORKDIR)
      workdir=$rest
      mkdir -p "$stage_root$workdir"
      ;;
    COPY)
      from=
      if [[ $rest == --from=* ]]; then
        from=${rest%% *}
        from=${from#--from=}
        rest=${rest#* }
      fi
      read -r -a words <<<"$rest"
      dest=${words[-1]}
      [[ $dest == /* ]] || dest=$workdir/$dest
      echo "COPY ${from:+--from=$from }${words[*]}"
      for src in "${words[@]:0:${#words[@]}-1}"; do
        if [ -n "$from" ]; then
          origin=${STAGE_DIR[$from]}$src
        else
          in_context "$src" || die "COPY $src: not in the build context ($IGNORE)"
          origin=$REPO/$src
        fi
        if [ -d "$origin" ]; then
          # A directory's contents go into the destination directory.
          mkdir -p "$stage_root$dest"
          cp -a "$origin/." "$stage_root$dest/"
        elif [[ $dest == */ ]]; then
          mkdir -p "$stage_root$dest"
          cp -a "$origin" "$stage_root$dest"
        else
          mkdir -p "$(dirname "$stage_root$dest")"
          cp -a "$origin" "$stage_root$dest"
        fi
      done
      ;;
    RUN)
      [ "$stage" != runtime ] || die "RUN in the runtime stage: distroless has no shell"
      echo "RUN $rest"
      start=$SECONDS
      (cd "$stage_root$workdir" && /bin/sh -c "$rest")
      echo "(RUN took $((SECONDS - start)) s)"
      ;;
    USER) user=$rest ;;
    EXPOSE) read -r -a exposed <<<"$rest" ;;
    STOPSIGNAL) stopsignal=$rest ;;
    ENTRYPOINT) mapfile -t entrypoint < <(json_words "$rest") ;;
    CMD) mapfile -t cmd < <(json_words "$rest") ;;
    ENV | LABEL) die "$keyword: not emulated yet; teach this script" ;;
    *) die "unknown instruction: $line" ;;
  esac
done < <(instructions)

root=${STAGE_DIR[runtime]:-}
[ -n "$root" ] || die "no runtime stage"
uid=${user%%:*}
gid=${user#*:}
[[ $uid =~ ^[0-9]+$ && $gid =~ ^[0-9]+$ ]] || die "USER $user: use numeric uid:gid (runAsNonRoot checks it)"
[ "$uid" != 0 ] || die "USER is root"
[ "$stopsignal" = SIGTERM ] || die "STOPSIGNAL $stopsignal: taskd drains on SIGTERM"
[ "${#entrypoint[@]}" -gt 0 ] || die "no ENTRYPOINT"

# The binary the ENTRYPOINT names, found on the image's PATH as Docker would.
exe=
for dir in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
  if [ -x "$root$dir/${entrypoint[0]}" ]; then exe=$dir/${entrypoint[0]}; break; fi
done
[ -n "$exe" ] || die "ENTRYPOINT ${entrypoint[0]} is not on the image's PATH"

log "runtime libraries (distroless cc has glibc and libgcc, nothing else)"
while read -r lib; do
  package=$(dpkg -S "$(readlink -f "$lib")" 2>/dev/null | cut -d: -f1 | head -n 1) || true
  [ -n "$package" ] || package=$(dpkg -S "$lib" 2>/dev/null | cut -d: -f1 | head -n 1) || true
  case "$package" in
    libc6 | libgcc-s1) ;;
    *) die "$exe needs $lib (package ${package:-unknown}), which distroless cc does not have" ;;
  esac
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
  echo "$lib ($package)"
done < <(ldd "$root$exe" | grep -o '/[^ ]*')

log "the image: $(du -sh "$root" | cut -f1) unpacked; binary $(du -h "$root$exe" | cut -f1)"
echo "USER $user · WORKDIR $workdir · EXPOSE ${exposed[*]} · ENTRYPOINT ${entrypoint[*]} · CMD ${cmd[*]}"

# Runs the ENTRYPOINT with the given arguments as the container would: root file system
# read-only with /proc and /dev mounted in it, in WORKDIR, as USER with no supplementary groups,
# no capabilities left and no_new_privs (allowPrivilegeEscalation: false), with the image's PATH
# and HOME plus the NAME=value words given before the arguments.
in_image() {
  local env=(PATH=/usr/local/bin:/usr/bin:/bin HOME=/home/nonroot)
  while [[ ${1:-} == *=* ]]; do env+=("$1"); shift; done
  /usr/bin/env -i "${env[@]}" /usr/bin/unshare --mount --propagation private -- /bin/sh -c '
    root=$1; wd=$2; uid=$3; gid=$4; shift 4
    /bin/mount --bind "$root" "$root" && /bin/mount -o remount,bind,ro "$root" &&
      /bin/mount --rbind /proc "$root/proc" && /bin/mount --rbind /dev "$root/dev" &&
      exec /usr/bin/setpriv --no-new-privs -- \
        /usr/bin/nsenter --root="$root" --wd="$root$wd" --setuid="$uid" --setgid="$gid" -- "$@"
  ' sh "$root" "$workdir" "$uid" "$gid" "$exe" "${entrypoint[@]:1}" "$@"
}

log "taskd --version, as $user, read-only root"
in_image --version

log "taskd config (the ConfigMap's config.toml, mounted at $workdir)"
# The block scalar under `config.toml: |`, its indentation removed.
awk '/^  config\.toml: \|/ {on = 1; next} on && /^(    |$)/ {sub(/^    /, ""); print; next} on {exit}' \
  deploy/k8s/10-configmap.yaml >"$root$workdir/config.toml"
[ -s "$root$workdir/config.toml" ] || die "no config.toml in deploy/k8s/10-configmap.yaml"
in_image "DATABASE_URL=$DATABASE_URL" "REDIS_URL=$REDIS_URL" config >"$WORK/config.out"
grep -E '^(host|port|drain_delay|listen) ' "$WORK/config.out"

port=
for candidate in $(shuf -i 20000-29999 -n 50); do
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then port=$candidate; break; fi
done
[ -n "$port" ] || die "no free port"

log "taskd ${cmd[*]} (the image's CMD) on port $port, as $user, read-only root"
in_image "DATABASE_URL=$DATABASE_URL" "REDIS_URL=$REDIS_URL" \
  TASKD_REDIS__KEY_PREFIX=dockerfile-steps: "TASKD_WORKER__PORT=$port" \
  TASKD_WORKER__DRAIN_DELAY=1s "${cmd[@]}" >"$WORK/worker.log" 2>&1 &
worker_pid=$!
ready=
for _ in $(seq 1 300); do
  kill -0 "$worker_pid" 2>/dev/null || { cat "$WORK/worker.log"; die "the worker exited"; }
  if curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.1
done
[ -n "$ready" ] || { cat "$WORK/worker.log"; die "the worker did not become ready"; }
# The process that answers: its user, groups, capabilities and root.
pid=$(pgrep -P "$worker_pid" -x taskd || echo "$worker_pid")
grep -E '^(Name|Uid|Gid|Groups|CapEff|CapPrm|NoNewPrivs):' "/proc/$pid/status"
[ "$(awk '/^NoNewPrivs:/ {print $2}' "/proc/$pid/status")" = 1 ] || die "no_new_privs not set"
echo "root: $(readlink "/proc/$pid/root")  cwd: $(readlink "/proc/$pid/cwd")"
[ "$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")" = "$uid" ] || die "not running as $uid"
[ "$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")" = 0000000000000000 ] || die "capabilities left"
for path in /health/live /health/ready; do
  printf 'GET %s → ' "$path"
  curl -sS -o "$WORK/body" -w '%{http_code} ' "http://127.0.0.1:$port$path"
  cat "$WORK/body"; echo
done

log "SIGTERM"
kill -TERM "$pid"
status=0
wait "$worker_pid" || status=$?
worker_pid=
echo "exit status $status"
tail -n 3 "$WORK/worker.log"
[ "$status" = 0 ] || die "the worker did not exit 0 on SIGTERM"
if command -v psql >/dev/null; then
  psql -q "${DATABASE_URL%/*}/postgres" -c "DROP DATABASE IF EXISTS \"${DATABASE_URL##*/}\" WITH (FORCE)" || true
fi
if [ "${KEEP:-}" = 1 ]; then kept="kept in $root"; else kept="removed on exit"; fi
log "the Dockerfile's steps work (the image's root file system: $kept)"
