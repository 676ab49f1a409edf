-- The project detail is answered from memory too (src/api/memo.rs): its held
-- charges, quarantined samples and stale series must tell every listening replica
-- at commit which project changed, as the projects and ledger triggers of 0012 do
-- for balances. Identical notifications of one transaction are delivered once.
CREATE FUNCTION held_charge_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('os_credits_project_changed',
                      CASE WHEN TG_OP = 'DELETE' THEN OLD.project ELSE NEW.project END);
    RETURN NULL;
END
$$;
CREATE TRIGGER held_charge_changed AFTER INSERT OR UPDATE OR DELETE ON held_charges
FOR EACH ROW EXECUTE FUNCTION held_charge_changed();

-- Quarantined samples and stale series name a series; its project is the payload.
CREATE FUNCTION series_state_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed_project text;
BEGIN
    SELECT s.project INTO changed_project FROM series s
    WHERE s.id = CASE WHEN TG_OP = 'DELETE' THEN OLD.series_id ELSE NEW.series_id END;
    IF changed_project IS NOT NULL THEN
        PERFORM pg_notify('os_credits_project_changed', changed_project);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER quarantined_sample_changed AFTER INSERT OR UPDATE OR DELETE ON quarantined_samples
FOR EACH ROW EXECUTE FUNCTION series_state_changed();
CREATE TRIGGER stale_series_changed AFTER INSERT OR UPDATE OR DELETE ON stale_series
FOR EACH ROW EXECUTE FUNCTION series_state_changed();
