#!/usr/bin/env bash
# scripts/bench.sh — measure the relay against this machine's own limits, in one run.
#
#   scripts/bench.sh                     # embedded default (SQLite) → docs/benchmarks.md
#   scripts/bench.sh --postgres          # PostgreSQL → docs/benchmarks-postgres.md
#   scripts/bench.sh --duration-secs 10 --concurrency 32 --batch 4000 --out /tmp/b.md
#   scripts/bench.sh --export-mib 16 --out /tmp/b.md   # short: a 16 MiB export (default 1024)
#   scripts/bench.sh --export-mib 0 --contract-subjects 0 --count-erasures 0 \
#       --onehop-customers 10000 --onehop-erasures 3000 --out /tmp/b.md  # mostly the one hop
#   scripts/bench.sh --chaos             # the chaos test in full: SQLite, PostgreSQL, replicas
#   scripts/bench.sh --chaos --requests 300 --kills 6  # a shorter chaos run
#   (target/release/dsrelay-bench claims [--postgres] times claims of queued work alone)
#
# Steps:
#   1. cargo build --release --bins: the benchmark spawns the release service
#      binaries target/release/dsrelay-registry and target/release/dsrelay-processor
#      as processes of their own (so each one's resident memory can be read).
#   2. target/release/dsrelay-bench "$@" (see its --help; $CARGO_TARGET_DIR is
#      honoured). It measures a bare
#      mTLS gRPC echo and bare durable INSERT commits (the baselines), then the
#      relay: one registry and two processors with three no-op subprocessors
#      each, everything on 127.0.0.1 in a fresh temporary folder; then one hop
#      of real work: erasures of existing customers through a registry and one
#      processor with one SQL subprocessor on the sample accounting schema
#      (--onehop-customers, default 10000; a batch of --onehop-erasures, default
#      3000, 0 skips it, by --onehop-concurrency callers, default 64), completed
#      erasures/s against a target of 1500/s, the
#      holder's rows checked afterwards; then the
#      export: a return of data of --export-mib MiB (default 1024, 0 skips it)
#      through a registry and one processor, against a bare mTLS gRPC stream
#      of the same bytes. The export needs up to three times its size of free disk
#      in the temporary folder while it runs. Then a contract end over
#      --contract-subjects customers (default 1000000, 0 skips it) of the sample
#      accounting schema, against the bare statements on a copy of the same
#      database. Then the statement count: the relay again on a PostgreSQL
#      server of the run's own with pg_stat_statements (--count-erasures
#      erasures, default 500, 0 skips it; needs /usr/lib/postgresql/*/bin),
#      printing the statements, writes, rows written and commits one erasure
#      costs at each service, and listing every statement. It prints a table
#      and writes it, with a description of the machine, to docs/, keeping
#      the sections written by hand (headings that say "(written by hand") of
#      the file it replaces.
#   To see where the CPU goes, scripts/profile.sh records the services with perf
#   under the relay part of this benchmark.
#   With --postgres the run is wrapped in `DSRELAY_TEST_SH_ONLY_PG=1
#   scripts/test.sh ...`, which starts a throwaway PostgreSQL exactly as for the
#   tests (or uses DSRELAY_TEST_POSTGRES_URL when it is already set) and stops it
#   afterwards; the benchmark creates fresh databases in it for each service and
#   for the baseline.
#
# With --chaos (the first argument) the script measures nothing and writes
# nothing to docs/: after step 1 it runs the chaos test three times,
# `dsrelay-bench chaos` (stores on SQLite), `dsrelay-bench chaos --postgres`
# (stores on a PostgreSQL server the run starts in a temporary folder and kills
# too; the shared test server is never used) and `dsrelay-bench chaos --postgres
# --registries 2 --processors 3` (two registry and three processor replicas on
# that server, each service behind a load balancer of the run's own, single
# replicas killed), each with the remaining arguments (default 2,000 erasures,
# 20 SIGKILLs; see `dsrelay-bench chaos --help`). Each prints requests
# accepted, kills per target, connector calls against the bound the kills
# explain, acknowledgements made and received, the holders' effects, lost,
# duplicated and PASS or FAIL; the script exits non-zero if any run fails.
# `--chaos --postgres ...` runs only the one its arguments name (add
# `--registries 2 --processors 3` for the replicated one).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

chaos=0
if [ "${1:-}" = --chaos ]; then
    chaos=1
    shift
fi
postgres=0
for arg in "$@"; do
    case "$arg" in
        --postgres) postgres=1 ;;
    esac
done

printf 'bench.sh: building release binaries: cargo build --release --bins\n' >&2
cargo build --release --bins

bench="${CARGO_TARGET_DIR:-target}/release/dsrelay-bench"
if [ "$chaos" -eq 1 ]; then
    if [ "$postgres" -eq 1 ]; then
        exec "$bench" chaos "$@"
    fi
    status=0
    printf 'bench.sh: chaos test on SQLite: dsrelay-bench chaos %s\n' "$*" >&2
    "$bench" chaos "$@" || status=$?
    printf 'bench.sh: chaos test on PostgreSQL: dsrelay-bench chaos --postgres %s\n' "$*" >&2
    "$bench" chaos --postgres "$@" || status=$?
    printf 'bench.sh: chaos test on PostgreSQL with replicas: dsrelay-bench chaos --postgres --registries 2 --processors 3 %s\n' "$*" >&2
    "$bench" chaos --postgres --registries 2 --processors 3 "$@" || status=$?
    exit "$status"
fi
if [ "$postgres" -eq 1 ]; then
    DSRELAY_TEST_SH_ONLY_PG=1 exec scripts/test.sh "$bench" "$@"
else
    exec "$bench" "$@"
fi
