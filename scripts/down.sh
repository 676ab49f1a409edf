#!/usr/bin/env bash
# Stops what `make up-dev` started: the compose stack, or the local processes and the
# private PostgreSQL cluster (a system PostgreSQL is left alone).
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

load_env
mode=$(cat "$DEV_DIR/up-dev.mode" 2>/dev/null || echo local)
if [[ $mode == compose ]]; then
    if docker_engine; then
        (cd "$ROOT" && compose down)
    else
        warn "up-dev used docker compose but no Docker engine answers now; nothing to stop there"
    fi
fi
stop_pidfile "$DEV_DIR/os-credits.pid" "os-credits"
stop_pidfile "$DEV_DIR/demo-exporter.pid" "demo exporter"
bash "$ROOT/scripts/pg.sh" stop
rm -f "$DEV_DIR/up-dev.mode"
log "stopped"
