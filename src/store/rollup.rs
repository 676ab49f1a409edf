//! The ledger's day rollup (`ledger_daily`): exact sums per project, UTC day and
//! metric, kept in the transaction that writes the ledger. Single rows get theirs from
//! a trigger; the billing run writes its rows and their rollup in one statement.

/// Tells the ledger trigger that this transaction writes the rollup itself.
pub const BULK: &str = "SELECT set_config('os_credits.bulk_rollup', 'on', true)";

/// Where day buckets start: 2001-01-01 was a Monday, so weeks start on Mondays too.
pub const ORIGIN: &str = "TIMESTAMPTZ '2001-01-01 00:00:00+00'";

/// Wraps an `INSERT INTO ledger … SELECT …` so the same statement adds the inserted
/// rows to the rollup. Run only after [`BULK`] in the same transaction, or the
/// trigger counts the rows a second time.
pub fn with_rollup(insert: &str) -> String {
    format!(
        "WITH written AS ({insert}
             RETURNING project, time, metric, used_delta, granted_delta)
         INSERT INTO ledger_daily AS d (project, day, metric, used_delta, granted_delta, rows)
         SELECT project, date_bin('1 day', time, {ORIGIN}), coalesce(metric, ''),
                sum(used_delta), sum(granted_delta), count(*)
         FROM written GROUP BY 1, 2, 3
         ON CONFLICT (project, day, metric) DO UPDATE
         SET used_delta = d.used_delta + EXCLUDED.used_delta,
             granted_delta = d.granted_delta + EXCLUDED.granted_delta,
             rows = d.rows + EXCLUDED.rows"
    )
}
