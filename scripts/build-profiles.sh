#!/usr/bin/env bash
# What each release profile costs to build and what it gives: a clean `cargo build` of the taskd
# binary per profile, each in a target directory of its own, timed (wall clock, and CPU time,
# which is what a shared or loaded machine does not change), then the proxy's instructions per
# request for each binary (scripts/instructions.sh, callgrind: repeatable whatever else runs).
#
#   bash scripts/build-profiles.sh                 # fat, thin and none
#   PROFILES="thin none" bash scripts/build-profiles.sh
#   INSTRUCTIONS=0 ...   builds only (then: bash scripts/instructions.sh proxy target/build-profiles/*/release/taskd)
#
# The profiles are the release profile with these overrides (environment, not Cargo.toml):
#   fat   lto = "fat",   codegen-units = 1    (profile `dist`: benchmarks and releases)
#   thin  lto = "thin",  codegen-units = 16
#   none  lto = false,   codegen-units = 16   (Cargo's default release: `cargo run --release`)
# Results go to target/build-profiles/results.tsv; the builds to target/build-profiles/<name>.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILES=${PROFILES:-fat thin none}
OUT=target/build-profiles
mkdir -p "$OUT"
results="$OUT/results.tsv"
[ -s "$results" ] || printf 'profile\twall_s\tcpu_s\tbinary_mib\tinstructions_per_request\n' >"$results"

for name in $PROFILES; do
  case "$name" in
    fat) lto=fat cgu=1 ;;
    thin) lto=thin cgu=16 ;;
    none) lto=false cgu=16 ;;
    *) echo "build-profiles: unknown profile $name" >&2; exit 2 ;;
  esac
  dir="$OUT/$name"
  rm -rf "$dir"
  echo "==> $name: lto=$lto codegen-units=$cgu (clean build)"
  /usr/bin/time -f '%e %U %S' -o "$OUT/$name.time" \
    env CARGO_TARGET_DIR="$dir" CARGO_PROFILE_RELEASE_LTO="$lto" \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS="$cgu" cargo build --release -q --bin taskd
  read -r wall user sys <"$OUT/$name.time"
  cpu=$(echo "$user + $sys" | bc)
  size=$(du -m "$dir/release/taskd" | cut -f1)
  per=-
  if [ "${INSTRUCTIONS:-1}" != 0 ]; then
    echo "==> $name: instructions per request"
    per=$(bash scripts/instructions.sh proxy "$dir/release/taskd" | awk -v bin="$dir/release/taskd" '$1 == bin {print $4}')
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$wall" "$cpu" "$size" "$per" | tee -a "$results"
done
echo
column -t "$results"
