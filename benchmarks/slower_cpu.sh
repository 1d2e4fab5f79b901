#!/usr/bin/env bash
# Run a command as on a machine whose every core is FACTOR times slower (Linux, cgroup v1, as root):
#
#     bash benchmarks/slower_cpu.sh 2 .venv/bin/python benchmarks/bench_eta.py --only main --budget 11m
#
# Each process of the command (Ray's and the trials' included) gets a cgroup of its own capped at 1/FACTOR of a CPU:
# a watcher moves every new process out of the cgroup it was forked into. So one process alone runs as slowly as
# two at once, and `--budget`'s probe sees the slow cores as the trials do (a single quota for the whole command
# lets a process alone run at full speed, and the probe then misjudges the trials). The slowdown of the trials can
# be read from their epoch times in each trial's result.json.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bash benchmarks/slower_cpu.sh FACTOR COMMAND [ARG ...]" >&2; exit 2; }
factor=$1; shift
quota=$(python3 -c "import sys; f = float(sys.argv[1]); print(int(100000 / f) if f >= 1 else '')" "$factor" \
  2>/dev/null) || quota=
[ -n "$quota" ] || { echo "slower_cpu.sh: FACTOR $factor is not a number >= 1; give e.g. 2 or 1.5" >&2; exit 2; }
[ -w /sys/fs/cgroup/cpu ] || { echo "slower_cpu.sh: /sys/fs/cgroup/cpu is not writable; run it as root on a Linux" \
  "with cgroup v1's cpu controller" >&2; exit 2; }
root=/sys/fs/cgroup/cpu/llmm_slower_cpu
mkdir -p "$root"
running=$(mktemp)
watcher=

clean_up() {  # the watcher and the cgroups end with the command, also when it is interrupted
  rm -f "$running"
  [ -z "$watcher" ] || wait "$watcher" || true
  for group in "$root"/p* "$root"; do rmdir "$group" 2>/dev/null || true; done
}
trap clean_up EXIT

own_cgroup() {  # $1: a process id; a cgroup of its own, capped
  mkdir -p "$root/p$1" && echo 100000 > "$root/p$1/cpu.cfs_period_us" && echo "$quota" > "$root/p$1/cpu.cfs_quota_us"
  echo "$1" > "$root/p$1/cgroup.procs" 2>/dev/null || true  # gone already
}

watch() {  # every process not alone in its own cgroup is moved to one
  shopt -s nullglob
  while [ -f "$running" ]; do
    for group in "$root" "$root"/p*; do
      for pid in $(cat "$group/cgroup.procs" 2>/dev/null); do
        [ "$group" = "$root/p$pid" ] || own_cgroup "$pid"
      done
    done
    sleep 0.2
  done
}

watch & watcher=$!
status=0
(echo "$BASHPID" > "$root/cgroup.procs" && exec "$@") || status=$?
exit "$status"
