#!/usr/bin/env bash
# `make fuzz`: property-based tests of the HTTP API against its own OpenAPI
# description. Starts the real service (debug build) on a fresh database with the
# demo exporter's data, then runs schemathesis `--checks all` against
# /api/openapi.json twice: with the API key and without it. Fails on any 5xx or any
# answer that does not match the description. `positive_data_acceptance` is left
# out: it expects every schema-valid request to succeed, and some rules span fields
# or a grammar OpenAPI cannot state (start_date before end_date, a log filter's
# syntax); those answers are documented 400s.
#
# schemathesis comes from PyPI into a virtualenv under .dev/ (installed once, reused
# after). FUZZ_MAX_EXAMPLES (default 30) bounds the cases per operation.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

VENV="$DEV_DIR/schemathesis"
ST="$VENV/bin/schemathesis"
KEY=fuzz-api-key
RUN_DIR="$DEV_DIR/fuzz"

ensure_schemathesis() {
    if "$ST" --version >/dev/null 2>&1; then
        return
    fi
    command -v python3 >/dev/null || die "python3 is needed to install schemathesis (apt-get install python3-venv)"
    log "installing schemathesis from PyPI into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed: install python3-venv"
    "$VENV/bin/pip" install --quiet 'schemathesis>=4,<5' ||
        die "pip install schemathesis failed (see above): check the network"
    "$ST" --version >/dev/null || die "schemathesis does not run after installing it"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n ${DB:-} ]]; then
        PGPASSWORD=${PG_PASSWORD:-} psql -q -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres \
            -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

ensure_schemathesis
cd "$ROOT"
log "building the service"
cargo build --quiet --bin os-credits
BIN="$ROOT/target/debug/os-credits"

eval "$(bash "$ROOT/scripts/pg.sh" env)"
DB="osc_fuzz_$$"
bash "$ROOT/scripts/pg.sh" createdb "$DB" >/dev/null
mkdir -p "$RUN_DIR"

DEMO_PORT=$(free_port)
"$BIN" demo-exporter --host 127.0.0.1 --port "$DEMO_PORT" >"$RUN_DIR/demo-exporter.log" 2>&1 &
PIDS+=($!)
wait_for_http "http://127.0.0.1:$DEMO_PORT/metrics" 30 "${PIDS[-1]}" ||
    die "the demo exporter did not start (see $RUN_DIR/demo-exporter.log)"

PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
env POSTGRES_HOST="$PG_HOST" POSTGRES_PORT="$PG_PORT" POSTGRES_USER="$PG_USER" \
    POSTGRES_PASSWORD="${PG_PASSWORD:-}" POSTGRES_DB="$DB" \
    CREDITS_HOST=127.0.0.1 CREDITS_PORT="$PORT" API_KEY="$KEY" \
    SCRAPE_TARGETS="http://127.0.0.1:$DEMO_PORT/metrics" SCRAPE_INTERVAL=2 BILLING_INTERVAL=3 \
    MAIL_FILE_DIR="$RUN_DIR/mail" RUST_LOG=warn \
    "$BIN" >"$RUN_DIR/service.log" 2>&1 &
PIDS+=($!)
wait_for_http "$URL/ping" 60 "${PIDS[-1]}" || die "the service did not start (see $RUN_DIR/service.log)"
log "waiting for demo data (scraped and billed)"
deadline=$((SECONDS + 60))
until curl -fsS -H "X-API-KEY: $KEY" "$URL/api/projects" 2>/dev/null | grep -q '"name"'; do
    ((SECONDS < deadline)) || die "no billed projects after 60 s (see $RUN_DIR/service.log)"
    sleep 1
done

failed=0
for auth in with without; do
    headers=()
    [[ $auth == with ]] && headers=(--header "X-API-KEY: $KEY")
    log "schemathesis --checks all, $auth the API key"
    # /api/v1/write takes snappy protobuf, which schemathesis cannot generate; its bad
    # bodies are covered by tests/remote_write.rs against a real Prometheus.
    "$ST" run "$URL/api/openapi.json" --checks all --exclude-checks positive_data_acceptance "${headers[@]}" \
        --exclude-path /api/v1/write \
        --max-examples "${FUZZ_MAX_EXAMPLES:-30}" --workers 1 --no-color || failed=1
done
if ! kill -0 "${PIDS[-1]}" 2>/dev/null; then
    die "the service died during the fuzzing (see $RUN_DIR/service.log)"
fi
((failed == 0)) || die "schemathesis found answers that break the OpenAPI description (see above)"
log "no 5xx and no schema violation, with and without the API key"
