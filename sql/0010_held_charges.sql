-- The jump guard (src/billing/guard.rs): counter steps whose rate is implausible
-- (a re-weighting of the exporter's history, not usage) are held here instead of
-- billed, until an operator approves (a usage ledger row naming the actor) or
-- rejects them, or the counter drops back (rejected automatically).
CREATE TABLE held_charges (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project         text        NOT NULL,
    series_id       bigint      NOT NULL,
    metric          text        NOT NULL,
    -- the held step: the samples before and after it
    from_time       timestamptz NOT NULL,
    to_time         timestamptz NOT NULL,
    from_value      numeric     NOT NULL CHECK (from_value <> 'NaN'),
    to_value        numeric     NOT NULL CHECK (to_value <> 'NaN'),
    -- its usage and the exact credits it would cost (price when one price covers it)
    quantity        numeric     NOT NULL CHECK (quantity <> 'NaN'),
    price           numeric     CHECK (price <> 'NaN'),
    credits         numeric     NOT NULL CHECK (credits <> 'NaN'),
    reason          text        NOT NULL,
    held_at         timestamptz NOT NULL,
    status          text        NOT NULL DEFAULT 'held'
                    CHECK (status IN ('held', 'approved', 'rejected')),
    decided_at      timestamptz,
    decided_by      text,
    decision_reason text,
    -- approved: the usage ledger row that billed it
    ledger_id       bigint,
    UNIQUE (series_id, to_time),
    CHECK ((status = 'held') = (decided_at IS NULL))
);
CREATE INDEX held_charges_project_idx ON held_charges (project, to_time DESC);
CREATE INDEX held_charges_open_idx ON held_charges (series_id) WHERE status = 'held';

-- What the guard remembers of each counter series: its recent rate (units per
-- hour, an exponentially weighted mean of billed steps) and the billed time behind it.
CREATE TABLE series_rates (
    series_id       bigint  PRIMARY KEY,
    rate_per_hour   numeric NOT NULL CHECK (rate_per_hour <> 'NaN'),
    covered_seconds bigint  NOT NULL
);

-- Completeness (src/scrape/completeness.rs): how many billed series each target
-- returned in its last successful scrape and the one before, and the last count
-- that was not zero, so a target that goes empty (a federating Prometheus answers
-- 200 without the series of an exporter that is down) is reported.
ALTER TABLE scrape_targets
    ADD COLUMN billed_series              bigint,
    ADD COLUMN billed_series_before       bigint,
    ADD COLUMN billed_series_last_nonzero bigint,
    ADD COLUMN billed_series_nonzero_at   timestamptz;

-- Series a target returned in one scrape and not in the next: billing for them has
-- stopped. Deleted when the series appears again.
CREATE TABLE stale_series (
    series_id    bigint      PRIMARY KEY,
    target       text        NOT NULL,
    -- the last scrape that returned it, and the first that did not
    last_seen_at timestamptz NOT NULL,
    missing_since timestamptz NOT NULL
);

-- A held charge is announced to the cloud governance through the notification
-- outbox (mail to CLOUD_GOVERNANCE_MAIL and the portal webhook, "charge held for
-- review"): such a notification names the held charge and has no threshold.
ALTER TABLE notifications
    ADD COLUMN held_charge_id bigint,
    ALTER COLUMN threshold DROP NOT NULL,
    ALTER COLUMN granted DROP NOT NULL,
    DROP CONSTRAINT notifications_cause_check,
    ADD CONSTRAINT notifications_cause_check
        CHECK (cause IN ('usage', 'grant', 'adjustment', 'held')),
    ADD CONSTRAINT notifications_kind_check
        CHECK ((held_charge_id IS NULL) = (threshold IS NOT NULL AND granted IS NOT NULL));
