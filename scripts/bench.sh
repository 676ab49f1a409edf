#!/usr/bin/env bash
# `make bench`: cargo bench against the same PostgreSQL the tests use.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

export_test_postgres
cd "$ROOT"
cargo bench "$@"
