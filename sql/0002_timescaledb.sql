-- Hypertables where TimescaleDB can be used; plain tables (same schema) elsewhere.
-- The extension must be preloaded (shared_preload_libraries) to be created.
-- `ALTER DATABASE … SET os_credits.timescaledb = off` keeps a new database plain on a
-- TimescaleDB server (tests of the conversion use it).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
       AND current_setting('shared_preload_libraries', true) LIKE '%timescaledb%'
       AND coalesce(current_setting('os_credits.timescaledb', true), '') <> 'off'
    THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
    END IF;

    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('usage_samples', by_range('time', INTERVAL '7 days'),
                                  if_not_exists => true, migrate_data => true);
        ALTER TABLE usage_samples SET (
            timescaledb.compress,
            timescaledb.compress_segmentby = 'series_id',
            timescaledb.compress_orderby = 'time DESC'
        );
        PERFORM add_compression_policy('usage_samples', compress_after => INTERVAL '30 days',
                                       if_not_exists => true);
    END IF;
END
$$;
