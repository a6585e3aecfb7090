#!/usr/bin/env bash
# scripts/profile.sh — where the services spend their CPU under the benchmark's relay load.
#
#   scripts/profile.sh                    # → ./profile-out/ (summary.md and perf data)
#   scripts/profile.sh /tmp/prof          # another output folder
#   PROFILE_BATCH=4000 PROFILE_SECS=10 scripts/profile.sh
#   PROFILE_NO_BUILD=1 scripts/profile.sh   # the release binaries as they are (no build)
#
# What it does:
#   1. cargo build --release --bins (as scripts/bench.sh does; $CARGO_TARGET_DIR honoured).
#      The release profile keeps symbols, which is all a flat profile needs.
#   2. Runs the benchmark's relay part only: target/release/dsrelay-bench with
#      --export-mib 0 --contract-subjects 0 --count-erasures 0 --onehop-erasures 0
#      (SQLite, the embedded default; add PROFILE_ARGS="--postgres" with
#      DSRELAY_TEST_POSTGRES_URL set for PostgreSQL), --batch $PROFILE_BATCH (default
#      2000) and fixed-time loads of $PROFILE_SECS s (default 5). Its report goes to OUT/bench.md, not to docs/.
#   3. As soon as the benchmark has started the relay's services (its child
#      processes dsrelay-registry and dsrelay-processor), records them with
#      `perf record -F 499 -g`: one recording for the registry, one for both
#      processors, until the services exit at the end of the run. The warm-up,
#      the completed-propagations batch, the latency load and the Submit load are
#      all in it.
#   4. Writes OUT/summary.md: per recording the samples, the share per thread
#      (`--sort comm`: the tokio runtime's workers against the thread sqlx runs each
#      SQLite connection on), what the time spent switching threads waited in (the
#      callers of `finish_task_switch`), the top symbols by their own share of the
#      samples (`perf report --no-children --sort sym`), and the share per shared
#      object (`--sort dso`: the binary itself, libc, the kernel). Open the .data files
#      with `perf report -i` for more.
#
# Needs perf (/usr/bin/perf) and permission to record another process
# (root, or kernel.perf_event_paranoid <= 1). Measures nothing else and writes
# nothing to docs/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

out="${1:-profile-out}"
batch="${PROFILE_BATCH:-2000}"
secs="${PROFILE_SECS:-5}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

if [ -z "${PROFILE_NO_BUILD:-}" ]; then
    printf 'profile.sh: building release binaries: cargo build --release --bins\n' >&2
    cargo build --release --bins
fi

bench="${CARGO_TARGET_DIR:-target}/release/dsrelay-bench"
# shellcheck disable=SC2086 # PROFILE_ARGS is a list of arguments on purpose.
"$bench" --export-mib 0 --contract-subjects 0 --count-erasures 0 --onehop-erasures 0 \
    --batch "$batch" --duration-secs "$secs" --latency-secs "$secs" \
    --out "$out/bench.md" ${PROFILE_ARGS:-} >"$out/bench.log" 2>&1 &
bench_pid=$!

# The relay's services are the benchmark's children; the bare echo server comes and goes
# before them.
registry="" processors=""
for _ in $(seq 1 600); do
    registry="$(pgrep -P "$bench_pid" -f 'dsrelay-registry' | head -n 1 || true)"
    processors="$(pgrep -P "$bench_pid" -f 'dsrelay-processor' | paste -sd, - || true)"
    if [ -n "$registry" ] && [ "$(tr ',' '\n' <<<"$processors" | grep -c .)" -ge 2 ]; then
        break
    fi
    if ! kill -0 "$bench_pid" 2>/dev/null; then
        printf 'profile.sh: the benchmark ended before the relay started; see %s\n' \
            "$out/bench.log" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$registry" ]; then
    printf 'profile.sh: the relay did not start in 60 s; see %s\n' "$out/bench.log" >&2
    kill "$bench_pid" 2>/dev/null || true
    exit 1
fi
printf 'profile.sh: recording registry %s and processors %s\n' "$registry" "$processors" >&2
perf record -F 499 -g -o "$out/registry.data" -p "$registry" >"$out/perf-registry.log" 2>&1 &
rec_r=$!
perf record -F 499 -g -o "$out/processors.data" -p "$processors" >"$out/perf-processors.log" 2>&1 &
rec_p=$!

status=0
wait "$bench_pid" || status=$?
# perf stops by itself when the processes it records have exited.
wait "$rec_r" || true
wait "$rec_p" || true
if [ "$status" -ne 0 ]; then
    printf 'profile.sh: the benchmark failed (%s); see %s\n' "$status" "$out/bench.log" >&2
fi

{
    printf '# Profile of the relay under the benchmark load\n\n'
    printf 'Written by `scripts/profile.sh` on %s, revision %s; the benchmark: %s\n\n' \
        "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(git rev-parse --short HEAD)" \
        "batch $batch, loads of $secs s ${PROFILE_ARGS:-}"
    for which in registry processors; do
        data="$out/$which.data"
        printf '## %s\n\n' "$which"
        printf 'Samples: %s (at 499 Hz per thread that runs)\n\n' \
            "$(perf report -i "$data" --stdio --sort comm 2>/dev/null \
                | sed -n 's/^# Samples: \([^ ]*\).*/\1/p' | head -n 1)"
        printf 'Share per thread (tokio-rt-worker: the async runtime; sqlx-sqlite-wor: the\n'
        printf "thread sqlx runs each SQLite connection on, to which every statement is handed):\n\n\`\`\`\n"
        perf report -i "$data" --no-children --sort comm --stdio -q -g none 2>/dev/null \
            | grep . | head -n 5
        printf '```\n\nWhat the time in the scheduler (`finish_task_switch`) waited in, callers\n'
        printf 'of 2 %% or more:\n\n```\n'
        perf report -i "$data" --no-children --sort sym -S finish_task_switch.isra.0 \
            -g caller,2,callee,function,percent --stdio 2>/dev/null \
            | grep -E -e '--[0-9.]+%--' | head -n 25 || true  # none may reach 2 %
        printf '```\n\nTop symbols by their own share of the samples:\n\n```\n'
        perf report -i "$data" --no-children --sort sym --stdio -q -g none \
            --percent-limit 0.7 2>/dev/null | head -n 30 || true
        printf '```\n\nShare per shared object:\n\n```\n'
        perf report -i "$data" --no-children --sort dso --stdio -q -g none \
            --percent-limit 0.5 2>/dev/null | head -n 15 || true
        printf '```\n\n'
    done
} >"$out/summary.md"
printf 'profile.sh: wrote %s\n' "$out/summary.md" >&2
exit "$status"
