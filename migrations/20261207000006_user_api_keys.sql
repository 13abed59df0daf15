-- User API keys: a session hash that stands for a user without a login, as Navixy's API key
-- hashes do (PROTOCOL.md §2: a socket's or an HTTP call's `hash` is a session hash or an API
-- key hash). A key is a row of `sessions` with a name, that never expires (`infinity`), so that
-- everything a session hash does (statuses, grants, `logout` when it ends) a key does the same
-- way. It ends when revoked (`fleetgate session revoke HASH`, `user/logout`), deleted, or when
-- its user (or master) is blocked or removed; unlike a login's session, not when the user's
-- password changes: a key is a credential of its own.

ALTER TABLE sessions ADD COLUMN api_key_name text
    CHECK (api_key_name IS NULL OR char_length(api_key_name) BETWEEN 1 AND 100);

CREATE OR REPLACE FUNCTION users_end_sessions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE sessions s SET revoked_at = now()
      FROM new_rows n JOIN old_rows o ON o.id = n.id
     WHERE s.revoked_at IS NULL
       AND (s.user_id = n.id OR s.user_id IN (SELECT u.id FROM users u WHERE u.master_id = n.id))
       AND ((n.blocked AND NOT o.blocked)
            OR (n.removed AND NOT o.removed)
            OR (n.password_hash IS DISTINCT FROM o.password_hash AND s.api_key_name IS NULL));
    RETURN NULL;
END $$;
