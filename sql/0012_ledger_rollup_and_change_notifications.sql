-- A per-project, per-day, per-metric rollup of the ledger, so a year of history in
-- day (or week) buckets reads ~365 rows per metric instead of ~100,000 ledger rows,
-- and change notifications so every replica can answer balances from memory.

-- Sums of every ledger row per project, UTC day and metric ('' for grants and
-- adjustments). Exact (NUMERIC); kept in the transaction that writes the ledger:
-- the billing run adds its rows in the same statement as its ledger insert, every
-- other writer through the trigger below.
CREATE TABLE ledger_daily (
    project       text        NOT NULL,
    day           timestamptz NOT NULL,
    metric        text        NOT NULL,
    used_delta    numeric     NOT NULL CHECK (used_delta <> 'NaN'),
    granted_delta numeric     NOT NULL CHECK (granted_delta <> 'NaN'),
    rows          bigint      NOT NULL,
    PRIMARY KEY (project, day, metric)
);

INSERT INTO ledger_daily (project, day, metric, used_delta, granted_delta, rows)
SELECT project, date_bin('1 day', time, TIMESTAMPTZ '2001-01-01 00:00:00+00'),
       coalesce(metric, ''), sum(used_delta), sum(granted_delta), count(*)
FROM ledger
GROUP BY 1, 2, 3;

-- Per-row upkeep for writers of single rows (grants, adjustments, manual SQL). The
-- billing run sets `os_credits.bulk_rollup` for its transaction and writes the
-- rollup of its rows itself, in one statement.
CREATE FUNCTION ledger_row_written() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger_daily AS d (project, day, metric, used_delta, granted_delta, rows)
    VALUES (NEW.project, date_bin('1 day', NEW.time, TIMESTAMPTZ '2001-01-01 00:00:00+00'),
            coalesce(NEW.metric, ''), NEW.used_delta, NEW.granted_delta, 1)
    ON CONFLICT (project, day, metric) DO UPDATE
    SET used_delta = d.used_delta + EXCLUDED.used_delta,
        granted_delta = d.granted_delta + EXCLUDED.granted_delta,
        rows = d.rows + 1;
    PERFORM pg_notify('os_credits_project_changed', NEW.project);
    RETURN NULL;
END
$$;

CREATE TRIGGER ledger_row_written AFTER INSERT ON ledger
FOR EACH ROW WHEN (current_setting('os_credits.bulk_rollup', true) IS DISTINCT FROM 'on')
EXECUTE FUNCTION ledger_row_written();

-- The ledger is append-only; a change or removal would silently break the rollup.
CREATE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only (% refused)', TG_OP;
END
$$;
CREATE TRIGGER ledger_is_append_only BEFORE UPDATE OR DELETE ON ledger
FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();

-- Every change of a project's row (balance, grant, billing progress, creation,
-- removal) tells every listening replica at commit which project changed.
CREATE FUNCTION project_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('os_credits_project_changed',
                      CASE WHEN TG_OP = 'DELETE' THEN OLD.name ELSE NEW.name END);
    RETURN NULL;
END
$$;
CREATE TRIGGER project_changed AFTER INSERT OR UPDATE OR DELETE ON projects
FOR EACH ROW EXECUTE FUNCTION project_changed();
