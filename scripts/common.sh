# Helpers shared by the scripts in this folder; source it, don't run it.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Git-ignored state of the local dev stack: pids, logs, the private PostgreSQL.
# shellcheck disable=SC2034 # used by the scripts that source this file
DEV_DIR="$ROOT/.dev"

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Loads .default.env, then .env (if present) over it, exporting every variable.
# Variables already in the process environment win over both files, so
# `CREDITS_PORT=8100 make up-dev` works.
load_env() {
    local file name
    local -A keep=()
    for file in "$ROOT/.default.env" "$ROOT/.env"; do
        [[ -f $file ]] || continue
        while IFS= read -r name; do
            [[ -v $name ]] && keep[$name]=${!name}
        done < <(sed -n 's/^[[:space:]]*\(export[[:space:]]\{1,\}\)\{0,1\}\([A-Za-z_][A-Za-z0-9_]*\)=.*/\2/p' "$file")
    done
    set -a
    for file in "$ROOT/.default.env" "$ROOT/.env"; do
        # shellcheck disable=SC1090
        [[ -f $file ]] && . "$file"
    done
    set +a
    for name in "${!keep[@]}"; do
        export "$name=${keep[$name]}"
    done
}

# True when an HTTP server answers `url` with a 2xx status.
http_ok() { curl -fsS -o /dev/null --max-time 5 "$1" 2>/dev/null; }

# Polls `url` until it answers 2xx; fails after `timeout` seconds, or as soon as
# process `pid` (optional) has exited.
wait_for_http() {
    local url=$1 timeout=$2 pid=${3:-}
    local deadline=$((SECONDS + timeout))
    until http_ok "$url"; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        ((SECONDS < deadline)) || return 1
        sleep 0.25
    done
}

# The host to put in URLs for a server bound to `host` (wildcards → loopback).
url_host() {
    case $1 in
    '' | 0.0.0.0 | '::' | '[::]') echo 127.0.0.1 ;;
    *:*) echo "[$1]" ;;
    *) echo "$1" ;;
    esac
}

# True when nothing accepts TCP connections on 127.0.0.1:`port`.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# True when the pid in `pidfile` is alive and runs one of our binaries.
pid_running() {
    local pidfile=$1 pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # Guard against a recycled pid that now belongs to something else.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'os-credits'
}

# Stops the process in `pidfile` (TERM, then KILL after a deadline) and removes the file.
stop_pidfile() {
    local pidfile=$1 what=$2 pid deadline
    if pid_running "$pidfile"; then
        pid=$(<"$pidfile")
        log "stopping $what (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 20))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            warn "$what did not stop within 20 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

# True when a Docker engine answers (not just the client being installed).
docker_engine() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

# Exports TEST_POSTGRES_* and TEST_STORAGE for the Rust tests and benches, from
# `scripts/pg.sh env STORAGE` (timescaledb, postgresql or auto; default auto).
export_test_postgres() {
    local pg_env
    pg_env=$(bash "$ROOT/scripts/pg.sh" env "${1:-auto}")
    eval "$pg_env"
    export TEST_POSTGRES_HOST=$PG_HOST TEST_POSTGRES_PORT=$PG_PORT TEST_POSTGRES_USER=$PG_USER
    export TEST_STORAGE=$PG_STORAGE
    if [[ -n ${PG_PASSWORD:-} ]]; then
        export TEST_POSTGRES_PASSWORD=$PG_PASSWORD
    fi
    log "tests use PostgreSQL at $PG_HOST:$PG_PORT as $PG_USER ($PG_MODE, storage $PG_STORAGE: $PG_STORAGE_WHY)"
}

# Runs Docker Compose v2 (`docker compose`), or v1 (`docker-compose`) where only that exists.
compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose "$@"
    elif command -v docker-compose >/dev/null 2>&1; then
        docker-compose "$@"
    else
        die "a Docker engine runs but neither 'docker compose' nor 'docker-compose' is installed"
    fi
}

# Sets SERVICE_URL and DEMO_METRICS_URL of the dev stack from the loaded environment.
# shellcheck disable=SC2034 # used by the callers
dev_urls() {
    SERVICE_URL="http://$(url_host "${CREDITS_HOST:-0.0.0.0}"):${CREDITS_PORT:-8000}"
    DEMO_METRICS_URL="http://127.0.0.1:${DEMO_EXPORTER_PORT:-9100}/metrics"
}
