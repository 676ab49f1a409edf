-- Integrity the billing code keeps, kept by the database as well, so a bug or a
-- hand-written statement fails loudly instead of leaving rows nothing can explain.
-- Series are never deleted, so every row naming a series must name one that exists.
ALTER TABLE billing_cursors
    ADD CONSTRAINT billing_cursors_series_fk FOREIGN KEY (series_id) REFERENCES series (id);
ALTER TABLE counter_decreases
    ADD CONSTRAINT counter_decreases_series_fk FOREIGN KEY (series_id) REFERENCES series (id),
    ADD CONSTRAINT counter_decreases_values_check
        CHECK (from_value <> 'NaN' AND to_value <> 'NaN');
ALTER TABLE unbilled_gaps
    ADD CONSTRAINT unbilled_gaps_series_fk FOREIGN KEY (series_id) REFERENCES series (id);
ALTER TABLE quarantined_samples
    ADD CONSTRAINT quarantined_samples_series_fk FOREIGN KEY (series_id) REFERENCES series (id);
ALTER TABLE held_charges
    ADD CONSTRAINT held_charges_series_fk FOREIGN KEY (series_id) REFERENCES series (id);
ALTER TABLE series_rates
    ADD CONSTRAINT series_rates_series_fk FOREIGN KEY (series_id) REFERENCES series (id);
ALTER TABLE stale_series
    ADD CONSTRAINT stale_series_series_fk FOREIGN KEY (series_id) REFERENCES series (id);

-- Each kind of ledger row carries exactly its own columns:
--  * usage: the metric, the billed range's start, the quantity and the price, and
--    no change of the grant. The price may be missing only on a held charge a person
--    approved (actor set) whose step spans a price change: no single price covers it.
--  * grant: changes only the grant, names no metric.
--  * adjustment: changes only the used credits, names no metric.
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_columns_check CHECK (
    CASE kind
        WHEN 'usage' THEN metric IS NOT NULL AND usage_from IS NOT NULL
                          AND quantity IS NOT NULL AND (price IS NOT NULL OR actor IS NOT NULL)
                          AND granted_delta = 0
        WHEN 'grant' THEN used_delta = 0 AND metric IS NULL AND quantity IS NULL
                          AND price IS NULL
        ELSE granted_delta = 0 AND metric IS NULL AND quantity IS NULL AND price IS NULL
    END
);
