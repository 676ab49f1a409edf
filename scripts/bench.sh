#!/usr/bin/env bash
# `make bench`: cargo bench against the same PostgreSQL the tests use, ending with one
# table of every bench's figures: measured, target (the README's), met or missed.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

export_test_postgres
cd "$ROOT"
BENCH_SUMMARY=$(mktemp)
export BENCH_SUMMARY
trap 'rm -f "$BENCH_SUMMARY"' EXIT
cargo bench "$@"

# The benches append tab-separated rows: bench, figure, measured, target, verdict.
echo
echo "== make bench: summary"
awk -F'\t' '
    BEGIN { n = 1; split("bench\tfigure\tmeasured\ttarget\tmet?", head, "\t"); for (i = 1; i <= 5; i++) cell[1, i] = head[i] }
    { n++; for (i = 1; i <= 5; i++) cell[n, i] = $i }
    END {
        for (r = 1; r <= n; r++) for (i = 1; i <= 5; i++) if (length(cell[r, i]) > w[i]) w[i] = length(cell[r, i])
        for (r = 1; r <= n; r++) {
            line = ""
            for (i = 1; i <= 5; i++) line = line sprintf("%-" w[i] "s  ", cell[r, i])
            sub(/ +$/, "", line); print line
            if (r > 1 && cell[r, 5] == "MISSED") missed++
            if (r > 1 && cell[r, 5] != "-") judged++
        }
        printf "%d of %d targets met\n", judged - missed, judged
    }' "$BENCH_SUMMARY"
