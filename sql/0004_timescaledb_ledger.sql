-- The ledger as a hypertable where TimescaleDB is installed (see 0002).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('ledger', by_range('time', INTERVAL '30 days'),
                                  if_not_exists => true, migrate_data => true);
        ALTER TABLE ledger SET (
            timescaledb.compress,
            timescaledb.compress_segmentby = 'project',
            timescaledb.compress_orderby = 'time DESC, id DESC'
        );
        PERFORM add_compression_policy('ledger', compress_after => INTERVAL '90 days',
                                       if_not_exists => true);
    END IF;
END
$$;
