-- Commit fences (src/store/changes.rs): a replica answers balances from memory
-- without asking the database while it holds a lease, and a writer, after its
-- commit, waits until every registered listener has applied the change (or until
-- any lease it could not reach has run out) before it returns.
--
-- A listening session registers here and holds the advisory lock (1869833074, key)
-- for as long as it lives: a row whose lock nobody holds is a listener whose
-- session ended without unregistering, and its replica may still answer from
-- memory until its lease runs out, so writers wait that long after first seeing it
-- gone (`gone_since`), then the row is dropped.
CREATE SEQUENCE change_listener_keys AS integer MINVALUE 1 CYCLE;

CREATE TABLE change_listeners (
    key           integer     PRIMARY KEY,
    registered_at timestamptz NOT NULL DEFAULT now(),
    gone_since    timestamptz
);

-- Registers the calling session (dropping its replica's previous registration,
-- whose lease ended before it registers again) and returns its key.
CREATE FUNCTION register_change_listener(previous integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    k integer := nextval('change_listener_keys');
BEGIN
    DELETE FROM change_listeners WHERE key = previous;
    INSERT INTO change_listeners (key) VALUES (k)
    ON CONFLICT (key) DO UPDATE SET registered_at = now(), gone_since = NULL;
    PERFORM pg_advisory_lock(1869833074, k);
    RETURN k;
END
$$;

-- Ends the calling session's registration (its replica stopped answering from
-- memory first).
CREATE FUNCTION unregister_change_listener(k integer) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM change_listeners WHERE key = k;
    PERFORM pg_advisory_unlock(1869833074, k);
END
$$;

-- The fence a writer sends after its commit: `token` to every listener (each
-- answers on os_credits_fence_ack once it has applied every change before it), the
-- live listeners' keys to wait for, and how long (ms) to wait at least for listeners
-- that went away without unregistering (`hold_ms` after they were first seen gone).
CREATE FUNCTION change_fence(token text, hold_ms integer, OUT live integer[], OUT wait_ms bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('os_credits_fence', token);
    SELECT coalesce(array_agg(l.key ORDER BY l.key), '{}') INTO live
    FROM change_listeners l
    WHERE EXISTS (
        SELECT 1 FROM pg_locks k
        WHERE k.locktype = 'advisory' AND k.granted AND k.objsubid = 2
          AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND k.classid = 1869833074 AND k.objid = l.key::oid);
    -- Rows only change when a listener went away: a fence normally writes nothing.
    UPDATE change_listeners SET gone_since = clock_timestamp()
    WHERE gone_since IS NULL AND key <> ALL (live);
    DELETE FROM change_listeners
    WHERE gone_since < clock_timestamp() - make_interval(secs => hold_ms / 1000.0);
    SELECT coalesce(max(ceil(extract(epoch FROM gone_since - clock_timestamp()) * 1000 + hold_ms)), 0)::bigint
    INTO wait_ms
    FROM change_listeners WHERE gone_since IS NOT NULL;
    wait_ms := greatest(wait_ms, 0);
END
$$;
