#!/usr/bin/env bash
# /metrics at 10,000 projects: what one call costs, and what 64 concurrent scrapers
# do to it and to current_credits. Run once per build to compare (issue 9, item 9):
#
#   benches/metrics.sh [path/to/os-credits]     (default: target/debug/os-credits)
#
# Uses the test PostgreSQL (TEST_POSTGRES_HOST/PORT/USER, default 127.0.0.1:5432
# postgres); creates and drops its own database. Sizes: BENCH_PROJECTS (10000),
# BENCH_SCRAPERS (64), BENCH_SECONDS (10).
set -euo pipefail
BIN=${1:-target/debug/os-credits}
PROJECTS=${BENCH_PROJECTS:-10000}
SCRAPERS=${BENCH_SCRAPERS:-64}
SECONDS_UNDER_LOAD=${BENCH_SECONDS:-10}
export PGHOST=${TEST_POSTGRES_HOST:-127.0.0.1} PGPORT=${TEST_POSTGRES_PORT:-5432} PGUSER=${TEST_POSTGRES_USER:-postgres}
DB=osc_bench_metrics_$$
PORT=$((20000 + $$ % 20000))
WORK=$(mktemp -d)
cleanup() {
    [[ -n ${PID:-} ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    psql -q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

psql -q -d postgres -c "CREATE DATABASE $DB" >/dev/null
POSTGRES_HOST=$PGHOST POSTGRES_PORT=$PGPORT POSTGRES_USER=$PGUSER POSTGRES_PASSWORD= POSTGRES_DB=$DB \
    "$BIN" migrate >/dev/null 2>&1
# Two series per project (vCPU, MB), 20 samples each, billed up to the 10th.
psql -q -d "$DB" >/dev/null <<SQL
INSERT INTO projects (name) SELECT 'p' || i FROM generate_series(1, $PROJECTS) i;
INSERT INTO series (metric, labels, series_key, project)
  SELECT m, jsonb_build_object('project_name', 'p' || i), m || '{project_name="p' || i || '"}', 'p' || i
  FROM generate_series(1, $PROJECTS) i, unnest(ARRAY['project_vcpu_usage', 'project_mb_usage']) m;
INSERT INTO usage_samples (series_id, time, value)
  SELECT s.id, now() - interval '1 hour' + j * interval '1 minute', j FROM series s, generate_series(1, 20) j;
INSERT INTO billing_cursors (series_id, last_time, last_value)
  SELECT s.id, now() - interval '1 hour' + 10 * interval '1 minute', 10 FROM series s;
ANALYZE;
SQL

POSTGRES_HOST=$PGHOST POSTGRES_PORT=$PGPORT POSTGRES_USER=$PGUSER POSTGRES_PASSWORD= POSTGRES_DB=$DB \
    CREDITS_HOST=127.0.0.1 CREDITS_PORT=$PORT ENDPOINTS_ONLY=true POSTGRES_POOL_SIZE=16 RUST_LOG=error \
    "$BIN" serve >"$WORK/log" 2>&1 &
PID=$!
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/ping" >/dev/null 2>&1 && break
    sleep 0.1
done
URL=http://127.0.0.1:$PORT

mean() { awk '{ s += $1; n++ } END { printf "%.4f", s / n }'; }
# Index probes into the samples: one backlog read of the gauges probes every series,
# so their growth over the series count is how often /metrics read the database.
probes() {
    sleep 1.5 # statistics reach the shared counters within a second
    psql -At -d "$DB" -c "SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_tables WHERE relname = 'usage_samples'"
}
SERIES=$((PROJECTS * 2))

# 1. One scraper: 20 calls in a row.
p0=$(probes)
for _ in $(seq 1 20); do curl -s -o /dev/null -w '%{time_total}\n' "$URL/metrics"; done >"$WORK/seq"
p1=$(probes)
# 2. 64 scrapers for a while, and a portal asking current_credits meanwhile.
stop_at=$(($(date +%s) + SECONDS_UNDER_LOAD))
scraper() {
    while (($(date +%s) < stop_at)); do
        curl -s -o /dev/null -w '%{time_total}\n' --max-time 60 "$URL/metrics"
    done
}
export -f scraper
export URL stop_at
for i in $(seq 1 "$SCRAPERS"); do scraper >"$WORK/load.$i" & done
credits_start=$(date +%s.%N)
for i in $(seq 1 20); do
    curl -s -o /dev/null -w '%{time_total}\n' --max-time 60 "$URL/api/current_credits/p$((i * 499))"
done >"$WORK/credits"
wait $(jobs -p | grep -v "^$PID$") 2>/dev/null || true
cat "$WORK"/load.* >"$WORK/load"
p2=$(probes)

echo "projects=$PROJECTS scrapers=$SCRAPERS seconds=$SECONDS_UNDER_LOAD binary=$BIN"
echo "metrics_one_scraper_mean_s=$(mean <"$WORK/seq")"
echo "metrics_one_scraper_database_reads=$(((p1 - p0) / SERIES)) (of 20 calls)"
echo "metrics_under_load_calls=$(wc -l <"$WORK/load")"
echo "metrics_under_load_mean_s=$(mean <"$WORK/load")"
echo "metrics_under_load_database_reads=$(((p2 - p1) / SERIES)) (of $(wc -l <"$WORK/load") calls)"
echo "current_credits_under_load_mean_s=$(mean <"$WORK/credits")"
