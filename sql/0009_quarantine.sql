-- Samples billing could not charge (a value beyond what an exact decimal holds, a
-- charge that overflows the decimal range): recorded with the reason, and the billing
-- cursor moves past them. Nothing is billed across one: for a counter the next good
-- sample is the new baseline (as a `rebase` decrease), for a gauge the step is not
-- billed (as a gap).
CREATE TABLE quarantined_samples (
    series_id   bigint           NOT NULL,
    time        timestamptz      NOT NULL,
    value       double precision NOT NULL,
    reason      text             NOT NULL,
    recorded_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (series_id, time)
);

-- A cursor past a quarantined sample has a time but no value to bill from: the
-- series' next sample is its new baseline.
ALTER TABLE billing_cursors ALTER COLUMN last_value DROP NOT NULL;
