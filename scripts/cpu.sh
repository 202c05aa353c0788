# CPU time per request, for the benchmark scripts (sourced: `. scripts/cpu.sh`). Read from
# /proc/<pid>/stat (user + system), it says what a request costs, which drifts less than req/s
# on a shared machine.

CPU_HZ=$(getconf CLK_TCK)

# cpu_ticks PID...: user + system CPU time of these processes so far, in clock ticks (a process
# that is gone counts 0).
cpu_ticks() {
  local total=0 pid
  for pid in "$@"; do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

# per_request TICKS REQUESTS: microseconds of CPU per request, one decimal.
per_request() {
  awk -v t="$1" -v n="$2" -v hz="$CPU_HZ" 'BEGIN { printf "%.1f", (n > 0) ? t * 1e6 / hz / n : 0 }'
}
