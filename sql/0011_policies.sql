-- Policies `os-credits migrate` owns (serve only reads them and reports drift):
-- samples_retention_days is SAMPLES_RETENTION_DAYS as last applied.
CREATE TABLE os_credits_policies (
    name       text PRIMARY KEY,
    value      bigint      NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
