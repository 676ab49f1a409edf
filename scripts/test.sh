#!/usr/bin/env bash
# `make test`: the Rust tests against a real PostgreSQL, then the up-dev smoke check.
# The tests create and drop a fresh database per test on the server named by
# TEST_POSTGRES_HOST/PORT/USER/PASSWORD.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

export_test_postgres
bash "$ROOT/scripts/ensure-chromium.sh"
bash "$ROOT/scripts/ensure-aiosmtpd.sh"
cd "$ROOT"
log "cargo test (unit, integration and doc tests; benches run with make bench)"
cargo test
bash "$ROOT/scripts/check-up-dev.sh"
