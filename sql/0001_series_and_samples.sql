-- Scraped usage: one row per series (metric + full label set) and one per sample.

CREATE TABLE series (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    metric      text        NOT NULL,
    -- every label of the series, target labels included
    labels      jsonb       NOT NULL,
    -- canonical `metric{a="x",b="y"}` text (labels sorted, values escaped): the identity,
    -- compared byte by byte
    series_key  text COLLATE "C" NOT NULL,
    -- value of the project label (PROJECT_LABEL) when the series was first seen
    project     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT series_key_unique UNIQUE (series_key),
    CONSTRAINT series_key_size CHECK (octet_length(series_key) <= 2048)
);
CREATE INDEX series_project_metric_idx ON series (project, metric);

-- No foreign key to series: it would cost a lookup per sample on the ingest path, and
-- series rows are never deleted.
CREATE TABLE usage_samples (
    series_id bigint           NOT NULL,
    time      timestamptz      NOT NULL,
    value     double precision NOT NULL,
    CONSTRAINT usage_samples_pkey PRIMARY KEY (series_id, time)
);

-- Per-target scrape status and the lease that lets one replica scrape a target at a time.
CREATE TABLE scrape_targets (
    name                 text        PRIMARY KEY,
    url                  text        NOT NULL,
    last_attempt_at      timestamptz,
    last_success_at      timestamptz,
    last_error           text,
    last_duration_ms     bigint,
    last_samples         bigint,
    samples_stored_total bigint      NOT NULL DEFAULT 0,
    scrapes_total        bigint      NOT NULL DEFAULT 0,
    failures_total       bigint      NOT NULL DEFAULT 0,
    lease_owner          text,
    lease_until          timestamptz
);
