-- A tracker's data source id (`trackers.source_id`, the device) changing is announced as
-- `i|<tracker_id>,…`, in payloads of 375 trackers (no range form).
--
-- State events carry the source id. The event processor takes it from its index (it learns it
-- from each tracker's subscribe and from every read that joins `trackers`) instead of looking
-- it up in `trackers` for every state it reads, which was a third of that read's cost; this
-- notification is how it learns that one changed. Nothing else about the tracker changes, so
-- no change number is stamped and no lifecycle event follows.

CREATE FUNCTION trackers_notify_source() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    items text[];
BEGIN
    SELECT array_agg(n.id::text ORDER BY n.id)
      INTO items
      FROM new_rows n JOIN old_rows o ON o.id = n.id
     WHERE n.source_id IS DISTINCT FROM o.source_id;
    PERFORM fleetgate_notify_chunks('i', items, 375);
    RETURN NULL;
END $$;

CREATE TRIGGER trackers_notify_src AFTER UPDATE ON trackers
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION trackers_notify_source();
