#!/usr/bin/env bash
# scripts/test.sh — run every dsrelay test (unit, store conformance on SQLite
# and PostgreSQL, end-to-end). This is the command README and CI use.
#
#   scripts/test.sh                      # whole suite
#   scripts/test.sh -E 'test(foo)'       # extra arguments go to the runner
#   scripts/test.sh store::              # (cargo nextest run / cargo test)
#
# Steps:
#   1. Unless DSRELAY_TEST_POSTGRES_URL is already set, start a throwaway
#      PostgreSQL server (fresh temp dir, 127.0.0.1 on a free port, trust auth)
#      and export DSRELAY_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:PORT/postgres.
#      The server also accepts TLS (plain connections still work) with a
#      certificate for 127.0.0.1 and localhost from a throwaway CA made with the
#      openssl command (installed with apt-get as root when missing), and
#      DSRELAY_TEST_POSTGRES_TLS_CA is exported as the path of that CA's PEM file.
#      It is stopped and its directory removed when this script exits, however
#      it exits (including Ctrl-C / SIGTERM). If no PostgreSQL server binaries
#      exist under /usr/lib/postgresql/*/bin, they are installed with apt-get
#      (needs root). As root the server runs as user `postgres`; otherwise it
#      runs as the current user.
#   2. cargo build --workspace --bins (end-to-end tests spawn the real
#      target/debug/dsrelay-registry and target/debug/dsrelay-processor).
#   3. cargo nextest run --workspace --no-fail-fast "$@", then cargo test
#      --workspace --doc (nextest does not run doctests); or, when
#      cargo-nextest is missing, cargo test, doctests included. Then
#      scripts/interop.sh (Python grpcio against both services). The doctests
#      and interop.sh are skipped when extra arguments were given.
#   The exit status is the first failing runner's status, else 0.
#
# Environment:
#   DSRELAY_TEST_POSTGRES_URL  use this PostgreSQL instead of starting one.
#   DSRELAY_TEST_POSTGRES_TLS_CA  with DSRELAY_TEST_POSTGRES_URL: the PEM file of
#                              the CA that issued that server's certificate (for
#                              the URL's host), for the TLS test; left as it is.
#   CI=true                    tests that need PostgreSQL fail instead of
#                              skipping when it is missing; selects the
#                              nextest profile `ci` (NEXTEST_PROFILE=ci).
#   DSRELAY_TEST_SH_ONLY_PG=1  debugging aid: only start PostgreSQL, run
#                              psql "$DSRELAY_TEST_POSTGRES_URL" -c 'select version()'
#                              and stop it again. With arguments, run them as a
#                              command instead (in the foreground, URL exported):
#     DSRELAY_TEST_SH_ONLY_PG=1 scripts/test.sh bash -c 'psql "$DSRELAY_TEST_POSTGRES_URL"'
set -euo pipefail

# Messages go to a copy of the original stderr so that they stay visible even
# when a trap fires inside a command whose output is redirected to a log file.
exec {log_fd}>&2
log() { printf 'test.sh: %s\n' "$*" >&"$log_fd"; }
die() { printf 'test.sh: ERROR: %s\n' "$*" >&"$log_fd"; exit 1; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Runner commands run as background jobs in their own process group (set -m)
# so that a signal sent to this script can be forwarded to the whole group
# and the trap below runs immediately instead of after the command finishes.
set -m
child_pid=""
pg_tmp=""
pg_bin=""
pg_started=0
cleaned=0

is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a PostgreSQL tool as the user the server runs as.
as_pg() {
    if is_root; then
        if command -v runuser >/dev/null 2>&1; then
            (cd "$pg_tmp" && runuser -u postgres -- "$@")
        else
            local q
            q=$(printf '%q ' "$@")
            (cd "$pg_tmp" && su postgres -s /bin/bash -c "$q")
        fi
    else
        "$@"
    fi
}

cleanup() {
    [ "$cleaned" -eq 1 ] && return 0
    cleaned=1
    if [ -n "$child_pid" ] && kill -0 "$child_pid" 2>/dev/null; then
        kill -TERM -- "-$child_pid" 2>/dev/null || true
        wait "$child_pid" 2>/dev/null || true
    fi
    if [ "$pg_started" -eq 1 ] && [ -f "$pg_tmp/data/postmaster.pid" ]; then
        log "stopping PostgreSQL"
        if ! as_pg "$pg_bin/pg_ctl" -D "$pg_tmp/data" -m fast -w -t 30 stop >/dev/null 2>&1; then
            log "fast stop failed; stopping PostgreSQL with -m immediate"
            as_pg "$pg_bin/pg_ctl" -D "$pg_tmp/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
        fi
        if [ -f "$pg_tmp/data/postmaster.pid" ]; then
            local pid
            pid=$(head -n1 "$pg_tmp/data/postmaster.pid" 2>/dev/null || true)
            if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
                log "killing leftover postmaster $pid"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
    fi
    if [ -n "$pg_tmp" ] && [ -d "$pg_tmp" ]; then
        rm -rf -- "$pg_tmp"
    fi
}

on_signal() {
    local sig=$1 code=$2
    trap - INT TERM HUP
    log "caught SIG$sig, stopping"
    if [ -n "$child_pid" ] && kill -0 "$child_pid" 2>/dev/null; then
        kill "-$sig" -- "-$child_pid" 2>/dev/null || true
        wait "$child_pid" 2>/dev/null || true
    fi
    cleanup
    exit "$code"
}
trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

# Run a command in its own process group with stdin from /dev/null (so that
# no tool tries to take over the terminal from a background process group),
# wait for it, return its status.
run() {
    local status=0
    "$@" </dev/null &
    child_pid=$!
    wait "$child_pid" || status=$?
    child_pid=""
    return "$status"
}

find_pg_bin() {
    local p
    p=$(ls -d /usr/lib/postgresql/*/bin/postgres 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$p" ] && dirname "$p"
}

free_port() {
    local p
    if command -v python3 >/dev/null 2>&1; then
        p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()' 2>/dev/null || true)
        if [[ "$p" =~ ^[0-9]+$ ]]; then echo "$p"; return 0; fi
    fi
    local i
    for i in $(seq 1 200); do
        p=$((20000 + RANDOM % 40000))
        if command -v ss >/dev/null 2>&1; then
            [ -z "$(ss -Htan "sport = :$p" 2>/dev/null)" ] && { echo "$p"; return 0; }
        elif ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"; return 0
        fi
    done
    return 1
}

# Installs the named packages with apt-get (the caller has checked for root).
# The package lists are fetched once per run: both PostgreSQL and openssl may be
# missing on a fresh machine.
apt_updated=0
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ "$apt_updated" -eq 0 ]; then
        apt-get update || die "apt-get update failed"
        apt_updated=1
    fi
    apt-get install -y "$@" || die "apt-get install -y $* failed"
}

# The openssl command, installed with apt-get (as root) when missing.
need_openssl() {
    command -v openssl >/dev/null 2>&1 && return 0
    is_root || die "the openssl command (package 'openssl') is needed to make the test" \
        "PostgreSQL server's TLS certificate: install it or set DSRELAY_TEST_POSTGRES_URL"
    log "openssl not found; installing package 'openssl' with apt-get"
    apt_install openssl
    command -v openssl >/dev/null 2>&1 || die "openssl installed but not found on PATH"
}

# A throwaway CA and a server certificate for 127.0.0.1 and localhost from it in
# $pg_tmp/tls. PostgreSQL refuses a key file that others may read or that another
# user owns, hence umask 077 and, as root, chown to the server's user.
make_pg_tls() {
    need_openssl
    local tls=$pg_tmp/tls
    log "making a throwaway CA and server certificate in $tls"
    # Chained with && because set -e does not apply inside an `if` condition.
    if ! (
        umask 077 &&
        mkdir "$tls" &&
        cd "$tls" &&
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout ca.key -out ca.pem -days 7 -subj '/CN=dsrelay test.sh throwaway CA' \
            -addext 'basicConstraints=critical,CA:TRUE' \
            -addext 'keyUsage=critical,keyCertSign,cRLSign' &&
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout server.key -out server.csr -subj '/CN=localhost' &&
        printf '%s\n' 'basicConstraints=critical,CA:FALSE' \
            'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' \
            'subjectAltName=IP:127.0.0.1,DNS:localhost' >server.ext &&
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -days 7 -extfile server.ext -out server.pem &&
        chmod 0644 ca.pem server.pem &&
        chmod 0600 server.key
    ) >"$pg_tmp/tls.log" 2>&1; then
        cat "$pg_tmp/tls.log" >&2
        die "making the TLS certificate for PostgreSQL with openssl failed"
    fi
    if is_root; then
        chown -R postgres: "$tls" || die "chown postgres: $tls failed"
    fi
}

start_postgres() {
    pg_bin=$(find_pg_bin || true)
    if [ -z "$pg_bin" ]; then
        is_root || die "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin and not root: install the 'postgresql' package or set DSRELAY_TEST_POSTGRES_URL"
        log "PostgreSQL server binaries not found; installing package 'postgresql' with apt-get"
        apt_install postgresql
        # The package may create and start a default cluster; this script does
        # not use it, so stop whatever the installation just started.
        if command -v pg_lsclusters >/dev/null 2>&1; then
            local ver name status rest
            while read -r ver name _ status rest; do
                if [ "$status" = online ]; then
                    log "stopping cluster $ver/$name started by the package installation"
                    pg_ctlcluster "$ver" "$name" stop || true
                fi
            done < <(pg_lsclusters -h 2>/dev/null || true)
        fi
        pg_bin=$(find_pg_bin || true)
        [ -n "$pg_bin" ] || die "PostgreSQL installed but no /usr/lib/postgresql/*/bin/postgres found"
    fi
    log "using PostgreSQL server binaries in $pg_bin"

    if is_root && ! id -u postgres >/dev/null 2>&1; then
        log "creating system user 'postgres'"
        useradd --system --home /var/lib/postgresql postgres || die "useradd postgres failed"
    fi

    pg_tmp=$(mktemp -d "${TMPDIR:-/tmp}/dsrelay-pg.XXXXXX")
    if is_root; then
        chown postgres: "$pg_tmp"
    fi

    log "initdb in $pg_tmp/data"
    if ! as_pg "$pg_bin/initdb" -D "$pg_tmp/data" -A trust -U postgres --no-sync \
            -E UTF8 --locale=C >"$pg_tmp/initdb.log" 2>&1; then
        cat "$pg_tmp/initdb.log" >&2
        die "initdb failed"
    fi
    make_pg_tls

    local port attempt
    # Plain and TLS connections both, on 127.0.0.1 and the socket in $pg_tmp.
    local opts="-c listen_addresses=127.0.0.1 -k '$pg_tmp' -c max_connections=200 -c ssl=on"
    opts+=" -c ssl_cert_file='$pg_tmp/tls/server.pem' -c ssl_key_file='$pg_tmp/tls/server.key'"
    for attempt in 1 2 3 4 5; do
        port=$(free_port) || die "could not find a free TCP port"
        log "starting PostgreSQL on 127.0.0.1:$port (attempt $attempt)"
        pg_started=1 # set before starting so a signal during pg_ctl still stops it
        if as_pg "$pg_bin/pg_ctl" -D "$pg_tmp/data" -l "$pg_tmp/postgres.log" -w -t 60 \
                -o "$opts -p $port" \
                start >/dev/null 2>&1; then
            export DSRELAY_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
            export DSRELAY_TEST_POSTGRES_TLS_CA="$pg_tmp/tls/ca.pem"
            log "DSRELAY_TEST_POSTGRES_URL=$DSRELAY_TEST_POSTGRES_URL"
            log "DSRELAY_TEST_POSTGRES_TLS_CA=$DSRELAY_TEST_POSTGRES_TLS_CA"
            return 0
        fi
        # pg_ctl may time out while the server is still coming up; stop it.
        as_pg "$pg_bin/pg_ctl" -D "$pg_tmp/data" -m immediate -w stop >/dev/null 2>&1 || true
        log "PostgreSQL failed to start; log:"
        tail -n 20 "$pg_tmp/postgres.log" >&2 || true
    done
    die "could not start PostgreSQL"
}

if [ -n "${DSRELAY_TEST_POSTGRES_URL:-}" ]; then
    log "using existing DSRELAY_TEST_POSTGRES_URL (not starting PostgreSQL)"
else
    start_postgres
fi

if [ "${DSRELAY_TEST_SH_ONLY_PG:-}" = 1 ]; then
    status=0
    if [ $# -gt 0 ]; then
        # In the foreground so that interactive tools (e.g. psql) work; a
        # SIGTERM to this script is handled when the command exits.
        log "DSRELAY_TEST_SH_ONLY_PG=1: running $*"
        "$@" || status=$?
    else
        log "DSRELAY_TEST_SH_ONLY_PG=1: psql select version()"
        run psql "$DSRELAY_TEST_POSTGRES_URL" -X -v ON_ERROR_STOP=1 -c 'select version()' || status=$?
    fi
    log "done (status $status)"
    exit "$status"
fi

ci=${CI:-}
if [ "${ci,,}" = true ] && [ -z "${NEXTEST_PROFILE:-}" ]; then
    export NEXTEST_PROFILE=ci
fi

log "building service binaries: cargo build --workspace --bins"
run cargo build --workspace --bins

status=0
if cargo nextest --version >/dev/null 2>&1; then
    log "running tests: cargo nextest run --workspace --no-fail-fast${*:+ $*}${NEXTEST_PROFILE:+ (NEXTEST_PROFILE=$NEXTEST_PROFILE)}"
    run cargo nextest run --workspace --no-fail-fast "$@" || status=$?
    if [ $# -eq 0 ]; then
        log "running doctests: cargo test --workspace --doc"
        doc_status=0
        run cargo test --workspace --doc || doc_status=$?
        [ "$status" -eq 0 ] && status=$doc_status
        log "running the Python gRPC interoperability test: scripts/interop.sh"
        interop_status=0
        run bash scripts/interop.sh || interop_status=$?
        [ "$status" -eq 0 ] && status=$interop_status
    else
        log "extra arguments given; skipping doctests and scripts/interop.sh"
    fi
else
    log "cargo-nextest not found; running tests: cargo test --workspace --no-fail-fast${*:+ $*}"
    run cargo test --workspace --no-fail-fast "$@" || status=$?
    # cargo test runs the doctests itself; the interoperability test is ours to run.
    if [ $# -eq 0 ]; then
        log "running the Python gRPC interoperability test: scripts/interop.sh"
        interop_status=0
        run bash scripts/interop.sh || interop_status=$?
        [ "$status" -eq 0 ] && status=$interop_status
    else
        log "extra arguments given; skipping scripts/interop.sh"
    fi
fi

if [ "$status" -eq 0 ]; then
    log "all tests passed"
else
    log "tests FAILED (status $status)"
fi
exit "$status"
