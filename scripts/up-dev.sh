#!/usr/bin/env bash
# Starts the local development stack and prints its URLs. Running it again starts
# nothing twice (a process whose binary was rebuilt since it started is restarted).
#
# With a Docker engine (`docker info` answers; UP_DEV_LOCAL=1 skips this):
#   docker compose up -d --build  (TimescaleDB, demo exporter, service from Dockerfile.dev)
# Without one, a local stack:
#   PostgreSQL from scripts/pg.sh (127.0.0.1:5432 or a private cluster), database
#   $POSTGRES_DB created if missing, then target/debug/os-credits as demo exporter
#   and as service in the background; pids and logs in .dev/.
# Settings: .default.env, then .env over it, then the process environment over both.
# SCRAPE_TARGETS defaults to the demo exporter.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# How long to wait for /health: the compose service compiles inside its container.
LOCAL_TIMEOUT=${UP_DEV_TIMEOUT:-120}
COMPOSE_TIMEOUT=${UP_DEV_TIMEOUT:-1200}

print_urls() {
    cat <<URLS

os-credits is up ($1):
  service        $SERVICE_URL/ping
  health         $SERVICE_URL/health
  demo exporter  $DEMO_METRICS_URL
$2  stop it with   make down
URLS
}

up_compose() {
    log "Docker engine found: docker compose up -d --build"
    echo compose >"$DEV_DIR/up-dev.mode"
    (cd "$ROOT" && compose up -d --build)
    log "waiting up to ${COMPOSE_TIMEOUT}s for $SERVICE_URL/health (the first start compiles)"
    wait_for_http "$SERVICE_URL/health" "$COMPOSE_TIMEOUT" ||
        die "the service did not become healthy; see: docker compose logs os-credits"
    print_urls "docker compose" "  grafana        http://127.0.0.1:${GRAFANA_PORT:-3000}/ (dashboards: folder os-credits)
  mail catcher   http://127.0.0.1:${MAILPIT_UI_PORT:-8025}/
  logs           docker compose logs -f
"
}

# Starts `$@` in the background unless the process in `pidfile` already runs.
start_bg() {
    local what=$1 pidfile=$2 logfile=$3 port=$4
    shift 4
    if pid_running "$pidfile"; then
        if [[ $BIN -nt $pidfile ]]; then
            log "$what: binary rebuilt since it started; restarting it"
            stop_pidfile "$pidfile" "$what"
        else
            log "$what already runs (pid $(<"$pidfile"))"
            return 0
        fi
    fi
    port_free "$port" || die "port $port is taken by another program; stop it or choose another port in .env"
    log "starting $what (log: ${logfile#"$ROOT"/})"
    printf '\n==== %s: %s\n' "$(date -u +%FT%TZ)" "$*" >>"$logfile"
    if command -v setsid >/dev/null 2>&1; then
        # Its own session, so that a Ctrl-C in this terminal later doesn't stop it.
        setsid "$@" >>"$logfile" 2>&1 </dev/null &
    else
        nohup "$@" >>"$logfile" 2>&1 </dev/null &
    fi
    echo $! >"$pidfile"
}

up_local() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust with rustup (https://rustup.rs)"
    command -v curl >/dev/null 2>&1 || die "curl not found (Debian: apt-get install -y curl)"
    echo local >"$DEV_DIR/up-dev.mode"

    log "building os-credits (debug)"
    (cd "$ROOT" && cargo build --bin os-credits)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/os-credits"

    local pg_env db=${POSTGRES_DB:-credits_db}
    pg_env=$(PG_PASSWORD=${POSTGRES_PASSWORD:-} bash "$ROOT/scripts/pg.sh" env)
    eval "$pg_env"
    PG_PASSWORD=${POSTGRES_PASSWORD:-} bash "$ROOT/scripts/pg.sh" createdb "$db"
    export POSTGRES_HOST=$PG_HOST POSTGRES_PORT=$PG_PORT POSTGRES_USER=$PG_USER POSTGRES_DB=$db
    export SCRAPE_TARGETS=${SCRAPE_TARGETS:-$DEMO_METRICS_URL}

    local demo_args=()
    # By default the demo's weights are edited 15 minutes after the start, re-weighting
    # every vCPU counter's history at once: the jump guard holds those steps for review
    # (GET /api/projects/{project}/held, the history page).
    local reweight_at
    reweight_at=$(date -u -d '+15 min' +%Y-%m-%dT%H:%M:%SZ)
    read -r -a demo_args <<<"${DEMO_EXPORTER_ARGS:---reweight-at $reweight_at}"
    start_bg "demo exporter" "$DEV_DIR/demo-exporter.pid" "$DEV_DIR/demo-exporter.log" \
        "${DEMO_EXPORTER_PORT:-9100}" \
        "$BIN" demo-exporter --host 127.0.0.1 --port "${DEMO_EXPORTER_PORT:-9100}" "${demo_args[@]}"
    start_bg "os-credits" "$DEV_DIR/os-credits.pid" "$DEV_DIR/os-credits.log" \
        "${CREDITS_PORT:-8000}" "$BIN" serve

    wait_for_http "$DEMO_METRICS_URL" 30 "$(<"$DEV_DIR/demo-exporter.pid")" || {
        tail -n 20 "$DEV_DIR/demo-exporter.log" >&2
        die "the demo exporter did not answer on $DEMO_METRICS_URL"
    }
    log "waiting up to ${LOCAL_TIMEOUT}s for $SERVICE_URL/health"
    wait_for_http "$SERVICE_URL/health" "$LOCAL_TIMEOUT" "$(<"$DEV_DIR/os-credits.pid")" || {
        tail -n 30 "$DEV_DIR/os-credits.log" >&2
        curl -sS --max-time 5 "$SERVICE_URL/health" >&2 || true
        die "os-credits did not become healthy on $SERVICE_URL/health (log: .dev/os-credits.log)"
    }
    print_urls "local processes, PostgreSQL at $PG_HOST:$PG_PORT ($PG_MODE), storage $PG_STORAGE: $PG_STORAGE_WHY" \
        "  logs           .dev/os-credits.log, .dev/demo-exporter.log
"
}

load_env
dev_urls
mkdir -p "$DEV_DIR"
if [[ ${UP_DEV_LOCAL:-0} != 1 ]] && docker_engine; then
    up_compose
else
    up_local
fi
