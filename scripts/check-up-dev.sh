#!/usr/bin/env bash
# Smoke test of the dev stack: `make up-dev`, check that the service answers /ping and
# /health and that the demo exporter serves metrics, then `make down` (always).
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

load_env
dev_urls
trap 'make --no-print-directory -C "$ROOT" down' EXIT
make --no-print-directory -C "$ROOT" up-dev

log "checking $SERVICE_URL/ping"
ping=$(curl -fsS --max-time 10 "$SERVICE_URL/ping")
[[ $ping == Pong ]] || die "/ping answered '$ping', expected 'Pong'"

log "checking $SERVICE_URL/health"
health=$(curl -sS --max-time 10 -w '\n%{http_code}' "$SERVICE_URL/health")
code=${health##*$'\n'}
body=${health%$'\n'*}
[[ $code == 200 ]] || die "/health answered $code: $body"
# The service answers compact JSON with `status` as its first field: it must be "ok"
# (a target that failed its scrape makes it "degraded"), and the database reachable.
[[ $body =~ ^\{\"status\":\"ok\" ]] || die "/health status is not \"ok\": $body"
[[ $body =~ \"database\":\{[^}]*\"reachable\":true ]] || die "/health says the database is not reachable: $body"

log "checking $DEMO_METRICS_URL"
metrics=$(curl -fsS --max-time 10 "$DEMO_METRICS_URL")
[[ $metrics == *'# TYPE project_vcpu_usage counter'* && $metrics == *'project_mb_usage{'* ]] ||
    die "the demo exporter's /metrics lacks project_vcpu_usage/project_mb_usage"

log "up-dev check passed"
