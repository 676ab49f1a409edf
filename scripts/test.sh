#!/usr/bin/env bash
# `make test`: the Rust tests against a real PostgreSQL, then the up-dev smoke check.
# The tests create and drop a fresh database per test on the server named by
# TEST_POSTGRES_HOST/PORT/USER/PASSWORD.
#
# TEST_STORAGE says on which kind of server (scripts/pg.sh starts it):
#   timescaledb  a cluster preloading TimescaleDB: the schema is hypertables
#   postgresql   a server without TimescaleDB preloaded: plain tables
#   both         the whole suite twice, TimescaleDB first (what CI runs)
#   auto         (default) timescaledb when TimescaleDB is installed, else postgresql
# Tests that need one kind say so; with CI=true a test whose kind is not at hand
# fails instead of skipping. Extra arguments go to `cargo test`.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

storage=${TEST_STORAGE:-auto}
case $storage in
both) runs=(timescaledb postgresql) ;;
timescaledb | postgresql | auto) runs=("$storage") ;;
*) die "TEST_STORAGE must be timescaledb, postgresql, both or auto, not '$storage'" ;;
esac

bash "$ROOT/scripts/ensure-chromium.sh"
bash "$ROOT/scripts/ensure-aiosmtpd.sh"
bash "$ROOT/scripts/ensure-prometheus.sh"
cd "$ROOT"
for run in "${runs[@]}"; do
    export_test_postgres "$run"
    log "cargo test on $TEST_STORAGE (unit, integration and doc tests; benches run with make bench)"
    cargo test "$@"
done
if [[ ${TEST_SKIP_UP_DEV:-0} != 1 ]]; then
    bash "$ROOT/scripts/check-up-dev.sh"
fi
