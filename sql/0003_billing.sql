-- Billing: projects with their grant and exact usage, per-series cursors, and the
-- append-only ledger. Money is NUMERIC (never NaN: rust_decimal cannot decode it).

CREATE TABLE projects (
    name            text PRIMARY KEY,
    -- credits granted in total (changed only together with a 'grant' ledger row)
    granted_credits numeric NOT NULL DEFAULT 0
                    CHECK (granted_credits <> 'NaN' AND granted_credits >= 0),
    -- exact sum of the ledger's used_delta (usage charges and adjustments)
    used_credits    numeric NOT NULL DEFAULT 0 CHECK (used_credits <> 'NaN'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_billed_at  timestamptz
);

-- Projects appear with their first series (and may be created by a grant before that).
INSERT INTO projects (name) SELECT DISTINCT project FROM series ON CONFLICT DO NOTHING;

-- The last billed sample of each series: usage after it is unbilled.
CREATE TABLE billing_cursors (
    series_id  bigint      PRIMARY KEY,
    last_time  timestamptz NOT NULL,
    last_value numeric     NOT NULL CHECK (last_value <> 'NaN'),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Append-only: rows are never updated or deleted.
CREATE TABLE ledger (
    id            bigint GENERATED ALWAYS AS IDENTITY,
    project       text        NOT NULL,
    -- usage: end of the billed sample range; grant/adjustment: when it was made
    time          timestamptz NOT NULL,
    booked_at     timestamptz NOT NULL DEFAULT now(),
    kind          text        NOT NULL CHECK (kind IN ('usage', 'grant', 'adjustment')),
    -- usage only: metric, start of the sample range, units used and price per unit
    metric        text,
    usage_from    timestamptz,
    quantity      numeric CHECK (quantity <> 'NaN'),
    price         numeric CHECK (price <> 'NaN'),
    -- change of used credits (usage, adjustment) and of granted credits (grant)
    used_delta    numeric     NOT NULL DEFAULT 0 CHECK (used_delta <> 'NaN'),
    granted_delta numeric     NOT NULL DEFAULT 0 CHECK (granted_delta <> 'NaN'),
    -- the project's totals after this row (exact), so history needs no running sums
    used_after    numeric     NOT NULL CHECK (used_after <> 'NaN'),
    granted_after numeric     NOT NULL CHECK (granted_after <> 'NaN'),
    -- grant/adjustment: why and who
    reason        text,
    actor         text,
    CONSTRAINT ledger_pkey PRIMARY KEY (id, time)
);
CREATE INDEX ledger_project_time_idx ON ledger (project, time DESC);

-- Every counter decrease seen while billing, with the policy that was applied.
CREATE TABLE counter_decreases (
    series_id  bigint      NOT NULL,
    time       timestamptz NOT NULL,
    from_value numeric     NOT NULL,
    to_value   numeric     NOT NULL,
    policy     text        NOT NULL CHECK (policy IN ('rebase', 'restart')),
    PRIMARY KEY (series_id, time)
);

-- Gauge steps longer than the rule's max gap: not billed, recorded.
CREATE TABLE unbilled_gaps (
    series_id bigint      NOT NULL,
    from_time timestamptz NOT NULL,
    to_time   timestamptz NOT NULL,
    PRIMARY KEY (series_id, from_time)
);
