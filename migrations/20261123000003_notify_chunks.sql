-- Notification payloads that always fit, and carry what the gateway needs.
--
-- 1. Tracker lifecycle changes are announced as `t|chg:id:event` lists in chunks, never as the
--    `T|min|max` range form: a range carries no event kind, so a bulk move of trackers to another
--    account could be read as an unblock and keep their states flowing to the old account.
-- 2. `n|account,…` lists (trackers added or restored, grants inserted) are chunked instead of
--    falling back to a range form that names no account.
-- 3. Chunks are small enough for the largest ids (150 items of at most 48 bytes < 8000 bytes),
--    and session hashes are 32 ASCII letters or digits, so 200 of them always fit.
-- 4. Restoring a removed tracker (removed true → false) announces its account, so `all` batch
--    targets pick it up again.

ALTER TABLE sessions ADD CONSTRAINT sessions_hash_ascii CHECK (hash ~ '^[A-Za-z0-9]{32}$');

-- Sends `<kind>|<item>,<item>,…` for `items`, `per_chunk` items a payload.
CREATE FUNCTION fleetgate_notify_chunks(kind text, items text[], per_chunk int) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    i int := 1;
    n int := coalesce(array_length(items, 1), 0);
BEGIN
    WHILE i <= n LOOP
        PERFORM pg_notify('fleetgate',
                          kind || '|' || array_to_string(items[i:i + per_chunk - 1], ','));
        i := i + per_chunk;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION trackers_notify_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    items text[];
    restored text[];
BEGIN
    SELECT array_agg(n.change_no || ':' || n.id || ':' ||
                     CASE WHEN n.removed OR n.account_id <> o.account_id THEN 'corrupt'
                          WHEN n.blocked THEN 'block'
                          ELSE 'unblock' END ORDER BY n.change_no)
      INTO items
      FROM new_rows n JOIN old_rows o ON o.id = n.id
     WHERE (n.removed AND NOT o.removed)
        OR (NOT n.removed AND NOT o.removed AND n.blocked IS DISTINCT FROM o.blocked)
        OR (n.account_id <> o.account_id);
    PERFORM fleetgate_notify_chunks('t', items, 150);
    -- Restored trackers, and trackers moved into an account, join that account's `all` targets.
    SELECT array_agg(DISTINCT n.account_id::text)
      INTO restored
      FROM new_rows n JOIN old_rows o ON o.id = n.id
     WHERE NOT n.removed AND (o.removed OR n.account_id <> o.account_id);
    PERFORM fleetgate_notify_chunks('n', restored, 300);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION trackers_notify_delete() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    items text[];
BEGIN
    SELECT array_agg(nextval('fleetgate_change_seq') || ':' || id || ':corrupt')
      INTO items FROM old_rows;
    PERFORM fleetgate_notify_chunks('t', items, 150);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION trackers_notify_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    items text[];
BEGIN
    SELECT array_agg(DISTINCT account_id::text) INTO items FROM new_rows WHERE NOT removed;
    PERFORM fleetgate_notify_chunks('n', items, 300);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION grants_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    items text[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT u.master_id::text) INTO items
          FROM new_rows g JOIN users u ON u.id = g.user_id
         WHERE u.master_id IS NOT NULL;
        PERFORM fleetgate_notify_chunks('n', items, 300);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION sessions_notify_delete() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    items text[];
BEGIN
    SELECT array_agg(hash) INTO items FROM old_rows;
    PERFORM fleetgate_notify_chunks('e', items, 200);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION grants_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    items text[];
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        SELECT array_agg(user_id || ':' || tracker_id || ':revoke') INTO items FROM old_rows;
        PERFORM fleetgate_notify_chunks('g', items, 150);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT array_agg(user_id || ':' || tracker_id || ':grant') INTO items FROM new_rows;
        PERFORM fleetgate_notify_chunks('g', items, 150);
    END IF;
    RETURN NULL;
END $$;
