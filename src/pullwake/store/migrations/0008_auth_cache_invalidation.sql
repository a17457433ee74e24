-- API processes cache API tokens and runner access (owner, admin status) in memory. Any change to
-- those rows, made through the API, the CLI or plain SQL, is announced on 'pullwake_invalidate'
-- at commit, and every process drops the entry named by the payload: 't:<token hash>',
-- 'r:<runner id>', or '*' for everything (TRUNCATE). Updates that change nothing cached (a
-- token's last_used_at, a runner's label) stay silent.

CREATE FUNCTION pullwake_token_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pullwake_invalidate', 't:' || OLD.token_hash);
    IF TG_OP = 'UPDATE' AND NEW.token_hash IS DISTINCT FROM OLD.token_hash THEN
        PERFORM pg_notify('pullwake_invalidate', 't:' || NEW.token_hash);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION pullwake_runner_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pullwake_invalidate', 'r:' || OLD.id);
    IF TG_OP = 'UPDATE' AND NEW.id IS DISTINCT FROM OLD.id THEN
        PERFORM pg_notify('pullwake_invalidate', 'r:' || NEW.id);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION pullwake_cache_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pullwake_invalidate', '*');
    RETURN NULL;
END $$;

CREATE TRIGGER principals_tokens_invalidate_update AFTER UPDATE ON principals_tokens
FOR EACH ROW WHEN (
    OLD.token_hash IS DISTINCT FROM NEW.token_hash
    OR OLD.principal IS DISTINCT FROM NEW.principal
    OR OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
) EXECUTE FUNCTION pullwake_token_changed();
CREATE TRIGGER principals_tokens_invalidate_delete AFTER DELETE ON principals_tokens
FOR EACH ROW EXECUTE FUNCTION pullwake_token_changed();
CREATE TRIGGER principals_tokens_invalidate_truncate AFTER TRUNCATE ON principals_tokens
FOR EACH STATEMENT EXECUTE FUNCTION pullwake_cache_truncated();

CREATE TRIGGER runners_invalidate_update AFTER UPDATE ON runners
FOR EACH ROW WHEN (
    OLD.id IS DISTINCT FROM NEW.id
    OR OLD.owner_principal IS DISTINCT FROM NEW.owner_principal
    OR OLD.admin_status IS DISTINCT FROM NEW.admin_status
) EXECUTE FUNCTION pullwake_runner_changed();
CREATE TRIGGER runners_invalidate_delete AFTER DELETE ON runners
FOR EACH ROW EXECUTE FUNCTION pullwake_runner_changed();
CREATE TRIGGER runners_invalidate_truncate AFTER TRUNCATE ON runners
FOR EACH STATEMENT EXECUTE FUNCTION pullwake_cache_truncated();

-- The id reservation: nothing reads it on the hot path today, but an id that changes hands
-- should not keep a cached owner anywhere.
CREATE TRIGGER runner_id_owners_invalidate_update AFTER UPDATE ON runner_id_owners
FOR EACH ROW WHEN (
    OLD.id IS DISTINCT FROM NEW.id OR OLD.owner_principal IS DISTINCT FROM NEW.owner_principal
) EXECUTE FUNCTION pullwake_runner_changed();
CREATE TRIGGER runner_id_owners_invalidate_delete AFTER DELETE ON runner_id_owners
FOR EACH ROW EXECUTE FUNCTION pullwake_runner_changed();
CREATE TRIGGER runner_id_owners_invalidate_truncate AFTER TRUNCATE ON runner_id_owners
FOR EACH STATEMENT EXECUTE FUNCTION pullwake_cache_truncated();
