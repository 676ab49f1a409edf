#!/usr/bin/env bash
# `make mutants`: mutation testing of the pure core with cargo-mutants (from
# crates.io, installed once): billing charges, money and rules, and the exposition
# parser. Each mutant is judged by the unit tests (`cargo test --lib`), which need no
# database. Survivors are either killed by a new test or listed in docs/mutants.md
# with why they are harmless. Arguments go to cargo-mutants (e.g. `--file
# src/money.rs` to look at one file, `--list` to count without running).
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CARGO_MUTANTS_VERSION=27.1.0
if ! cargo mutants --version 2>/dev/null | grep -q "$CARGO_MUTANTS_VERSION"; then
    log "installing cargo-mutants $CARGO_MUTANTS_VERSION from crates.io"
    cargo install cargo-mutants --locked --version "$CARGO_MUTANTS_VERSION" ||
        die "cargo install cargo-mutants failed (see above)"
fi
cd "$ROOT"
files=(src/billing/charge.rs src/money.rs src/billing/rules.rs src/ingest/parse.rs)
args=()
if [[ $* != *--file* && $* != *-f\ * ]]; then
    for file in "${files[@]}"; do args+=(--file "$file"); done
fi
# Unit tests only, each mutant bounded; the report lands in mutants.out/. `--lib` goes
# to every cargo call (`-- --lib` would reach only the test run, and the build before
# it would rebuild every integration test for each mutant: 40-70 s instead of 5 s).
# A mutant that loops forever is cut after 20 s (the unit tests take about 1 s).
cargo mutants "${args[@]}" --cargo-arg=--lib --timeout 20 "$@"
