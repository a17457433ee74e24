-- The wake state machine in Postgres: every state change is one autocommitted call.
--
-- Each public function (pullwake_send, pullwake_claim, pullwake_heartbeat, pullwake_done,
-- pullwake_release, pullwake_event, pullwake_signal, pullwake_expire_leases, ...) locks the
-- entity with its dispatch row (`FOR UPDATE`), checks, changes and answers one
-- `pullwake_step` row: `code` is NULL when the call did what it was asked, else a stable
-- answer code (an error code of the HTTP API, or NO_WORK / NOT_RUNNABLE / EXPIRED_NOW). A wake
-- created by the call comes back in the `pub_*` columns, to publish after commit.
--
-- The pullwake_x_* functions are building blocks; they expect the caller to hold the lock.

CREATE TYPE pullwake_step AS (
    code              text,
    detail            text,
    -- a claim handed out (claim, chaining done)
    claim_id          text,
    epoch             bigint,
    lease_ms          integer,
    lease_expires_at  timestamptz,
    url               text,
    type              text,
    entity_id         text,
    status            text,
    tags              jsonb,
    created_by        text,
    acked_offset      bigint,
    tail_offset       bigint,
    msg_offsets       bigint[],
    msg_payloads      jsonb[],
    msg_senders       text[],
    msg_created_at    timestamptz[],
    more_messages     boolean,
    waited_s          double precision,
    -- other answers
    msg_offset        bigint,
    wake_id           text,
    wake_status       text,
    wake_reason       text,
    duplicate         boolean,
    next_wake         boolean,
    entry_id          text,
    ended_claim_id    text,
    ended_reason      text,
    -- the wake to publish after commit
    pub_id            text,
    pub_url           text,
    pub_epoch         bigint,
    pub_reason        text,
    pub_created_at    timestamptz,
    pub_runner_id     text,
    pub_target_type   text
);

CREATE FUNCTION pullwake_new_id(p_prefix text) RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT p_prefix || '_'
        || lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0')
        || substr(replace(gen_random_uuid()::text, '-', ''), 1, 16)
$$;

-- The wake (epoch + 1) when the rules allow one: a runnable, unparked entity with pending work,
-- no outstanding wake and no active claim. Fills the pub_* columns of `r`.
CREATE FUNCTION pullwake_x_maybe_wake(r pullwake_step, p_url text, p_reason text)
RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    e record;
    w wakes;
BEGIN
    SELECT en.status, en.dispatch_policy, en.target_runner_id, d.tail_offset, d.acked_offset,
           d.epoch, d.outstanding_wake_id, d.active_claim_id, d.parked_reason
      INTO e
      FROM entities en JOIN dispatch_state d ON d.entity_url = en.url WHERE en.url = p_url;
    IF NOT (e.status IN ('idle', 'running') AND e.parked_reason IS NULL
            AND e.outstanding_wake_id IS NULL AND e.active_claim_id IS NULL
            AND e.tail_offset > e.acked_offset) THEN
        RETURN r;
    END IF;
    INSERT INTO wakes (id, entity_url, epoch, target, runner_id, reason)
    VALUES (pullwake_new_id('wk'), p_url, e.epoch + 1, e.dispatch_policy -> 'targets' -> 0,
            e.target_runner_id, p_reason)
    RETURNING * INTO w;
    UPDATE dispatch_state SET epoch = w.epoch, outstanding_wake_id = w.id,
           outstanding_wake_created_at = w.created_at, last_wake_id = w.id, updated_at = now()
     WHERE entity_url = p_url;
    r.pub_id := w.id; r.pub_url := p_url; r.pub_epoch := w.epoch; r.pub_reason := p_reason;
    r.pub_created_at := w.created_at; r.pub_runner_id := w.runner_id;
    r.pub_target_type := w.target ->> 'type';
    RETURN r;
END;
$$;

-- Retire the outstanding wake (it will find nothing to do).
CREATE FUNCTION pullwake_x_supersede(p_url text, p_why text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_wake text;
BEGIN
    SELECT outstanding_wake_id INTO v_wake FROM dispatch_state WHERE entity_url = p_url;
    IF v_wake IS NOT NULL THEN
        UPDATE wakes SET delivery_status = 'superseded', claim_status = 'expired',
               resolved_at = now(), last_error = coalesce(p_why, last_error)
         WHERE id = v_wake AND claim_status = 'unclaimed';
        UPDATE dispatch_state SET outstanding_wake_id = NULL, outstanding_wake_created_at = NULL,
               updated_at = now()
         WHERE entity_url = p_url;
    END IF;
END;
$$;

-- End the active claim (done, release, expiry, kill): ack, count attempts without progress and
-- park poison work, settle the status, and record on the claim whether work remains (so that a
-- retried done answers what the first one did). Fills ended_claim_id / ended_reason.
CREATE FUNCTION pullwake_x_end_claim(
    r pullwake_step, p_url text, p_claim_status text, p_reason text, p_acked bigint,
    p_error text, p_max_attempts integer
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    d record;
    v_progressed boolean;
    v_acked bigint;
    v_fails integer;
    v_parked text;
    v_status text;
BEGIN
    SELECT ds.acked_offset, ds.tail_offset, ds.failed_attempts, ds.parked_reason,
           ds.outstanding_wake_id, ds.active_claim_id, en.status
      INTO d
      FROM dispatch_state ds JOIN entities en ON en.url = ds.entity_url
     WHERE ds.entity_url = p_url;
    v_progressed := p_acked IS NOT NULL AND p_acked > d.acked_offset;
    v_acked := greatest(d.acked_offset, coalesce(p_acked, d.acked_offset));
    v_fails := CASE WHEN d.tail_offset > v_acked AND NOT v_progressed
                    THEN d.failed_attempts + 1 ELSE 0 END;
    v_parked := d.parked_reason;
    IF v_fails >= p_max_attempts AND v_parked IS NULL THEN
        v_parked := format('%s claims in a row ended without progress (last: %s)',
                           v_fails, p_reason);
    END IF;
    v_status := CASE d.status WHEN 'running' THEN 'idle' WHEN 'stopping' THEN 'stopped'
                ELSE d.status END;
    UPDATE dispatch_state SET acked_offset = v_acked, failed_attempts = v_fails,
           parked_reason = v_parked, active_claim_id = NULL, active_epoch = NULL,
           active_runner_id = NULL, active_token_hash = NULL, active_claimed_at = NULL,
           active_lease_expires_at = NULL, last_released_at = now(),
           last_error = coalesce(p_error, last_error), updated_at = now()
     WHERE entity_url = p_url;
    IF v_status <> d.status THEN
        UPDATE entities SET status = v_status, updated_at = now() WHERE url = p_url;
    END IF;
    UPDATE wakes SET claim_status = CASE WHEN p_reason = 'done' THEN 'completed' ELSE 'expired' END,
           resolved_at = now()
     WHERE id = d.active_claim_id;
    UPDATE claims SET status = p_claim_status, released_at = now(), acked_offset = p_acked,
           end_reason = p_reason, last_error = p_error,
           next_wake = (v_status IN ('idle', 'running') AND v_parked IS NULL
                        AND d.outstanding_wake_id IS NULL AND d.tail_offset > v_acked)
     WHERE id = d.active_claim_id AND status = 'active';
    r.ended_claim_id := d.active_claim_id;
    r.ended_reason := p_reason;
    RETURN r;
END;
$$;

-- The active claim's lease passed: expire it (its holder is fenced from now on) and hand the
-- work on with a new wake.
CREATE FUNCTION pullwake_x_expire(r pullwake_step, p_url text, p_max_attempts integer)
RETURNS pullwake_step LANGUAGE plpgsql AS $$
BEGIN
    r := pullwake_x_end_claim(r, p_url, 'expired', 'lease_expired', NULL, NULL, p_max_attempts);
    RETURN pullwake_x_maybe_wake(r, p_url, 'lease_expired');
END;
$$;

-- The claim as its holder sees it: the entity, the offsets and the first messages (up to
-- p_max_msgs, and past the first only while they fit p_max_bytes).
CREATE FUNCTION pullwake_x_claim_view(
    r pullwake_step, p_url text, p_max_msgs integer, p_max_bytes integer
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    e record;
    v_last bigint;
BEGIN
    SELECT en.url, en.type, en.id, en.status, en.tags, en.created_by, d.acked_offset,
           d.tail_offset, d.active_claim_id, d.active_epoch, d.active_lease_expires_at
      INTO e
      FROM entities en JOIN dispatch_state d ON d.entity_url = en.url WHERE en.url = p_url;
    r.claim_id := e.active_claim_id; r.epoch := e.active_epoch;
    r.lease_expires_at := e.active_lease_expires_at;
    r.url := e.url; r.type := e.type; r.entity_id := e.id; r.status := e.status;
    r.tags := e.tags; r.created_by := e.created_by;
    r.acked_offset := e.acked_offset; r.tail_offset := e.tail_offset;
    SELECT coalesce(array_agg(m."offset" ORDER BY m."offset"), '{}'),
           coalesce(array_agg(m.payload ORDER BY m."offset"), '{}'),
           coalesce(array_agg(m.sender ORDER BY m."offset"), '{}'),
           coalesce(array_agg(m.created_at ORDER BY m."offset"), '{}'),
           max(m."offset")
      INTO r.msg_offsets, r.msg_payloads, r.msg_senders, r.msg_created_at, v_last
      FROM (SELECT i."offset", i.payload, i.sender, i.created_at,
                   row_number() OVER w AS n, sum(i.payload_bytes) OVER w AS used
              FROM (SELECT * FROM inbox_messages
                     WHERE entity_url = p_url AND "offset" > e.acked_offset
                     ORDER BY "offset" LIMIT p_max_msgs) i
            WINDOW w AS (ORDER BY i."offset")) m
     WHERE m.n = 1 OR m.used <= p_max_bytes;
    r.more_messages := coalesce(v_last, e.acked_offset) < e.tail_offset;
    RETURN r;
END;
$$;

-- Turn the outstanding wake into the active, leased claim of p_runner_id (NULL: a webhook).
CREATE FUNCTION pullwake_x_activate(
    r pullwake_step, p_url text, p_wake_id text, p_runner_id text, p_token_hash text,
    p_lease_ms integer, p_max_msgs integer, p_max_bytes integer, p_delivered boolean
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    d record;
    v_expires timestamptz := now() + p_lease_ms * interval '1 millisecond';
BEGIN
    SELECT ds.acked_offset, ds.epoch, ds.outstanding_wake_created_at, en.status
      INTO d
      FROM dispatch_state ds JOIN entities en ON en.url = ds.entity_url
     WHERE ds.entity_url = p_url;
    -- A runner holding the claim had the wake: its audit row says delivered, whichever way it
    -- came (the stream, or a chaining done).
    UPDATE wakes SET claim_status = 'claimed', claimed_at = now(),
           delivery_status = CASE WHEN p_delivered AND delivery_status = 'queued'
                                  THEN 'delivered' ELSE delivery_status END,
           delivered_at = CASE WHEN p_delivered THEN coalesce(delivered_at, now())
                               ELSE delivered_at END,
           stream_entry_id = coalesce(stream_entry_id, r.entry_id)
     WHERE id = p_wake_id;
    INSERT INTO claims (id, epoch, entity_url, runner_id, token_hash, lease_expires_at,
                        start_acked_offset)
    VALUES (p_wake_id, d.epoch, p_url, p_runner_id, p_token_hash, v_expires, d.acked_offset);
    UPDATE dispatch_state SET outstanding_wake_id = NULL, outstanding_wake_created_at = NULL,
           active_claim_id = p_wake_id, active_epoch = d.epoch, active_runner_id = p_runner_id,
           active_token_hash = p_token_hash, active_claimed_at = now(),
           active_lease_expires_at = v_expires, last_claimed_at = now(), updated_at = now()
     WHERE entity_url = p_url;
    IF d.status = 'idle' THEN
        UPDATE entities SET status = 'running', updated_at = now() WHERE url = p_url;
    END IF;
    r.lease_ms := p_lease_ms;
    r.waited_s := greatest(extract(epoch FROM now() - d.outstanding_wake_created_at), 0);
    RETURN pullwake_x_claim_view(r, p_url, p_max_msgs, p_max_bytes);
END;
$$;

-- Lock the entity of a holder's claim and check its token and epoch. NULL when the holder
-- may go on (then pullwake_x_check_active), else the step with its code.
CREATE FUNCTION pullwake_x_holder(
    r pullwake_step, p_claim_id text, p_token_hash text, p_epoch bigint
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    c claims;
BEGIN
    SELECT * INTO c FROM claims WHERE id = p_claim_id;
    IF NOT FOUND THEN
        r.code := 'NOT_FOUND'; r.detail := format('claim %L does not exist', p_claim_id);
        RETURN r;
    END IF;
    IF c.token_hash <> p_token_hash THEN
        r.code := 'FORBIDDEN'; r.detail := 'the claim token does not belong to this claim';
        RETURN r;
    END IF;
    PERFORM 1 FROM entities en JOIN dispatch_state d ON d.entity_url = en.url
     WHERE en.url = c.entity_url FOR UPDATE OF en, d;
    SELECT * INTO c FROM claims WHERE id = p_claim_id;
    IF p_epoch <> c.epoch THEN
        r.code := 'FENCED';
        r.detail := format('epoch %s is stale; this claim holds epoch %s', p_epoch, c.epoch);
        RETURN r;
    END IF;
    r.url := c.entity_url;
    RETURN r;
END;
$$;

-- After pullwake_x_holder: refuse an ended claim, and expire (and hand on) a passed lease.
CREATE FUNCTION pullwake_x_check_active(r pullwake_step, p_claim_id text, p_max_attempts integer)
RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    c claims;
    d dispatch_state;
BEGIN
    SELECT * INTO c FROM claims WHERE id = p_claim_id;
    SELECT * INTO d FROM dispatch_state WHERE entity_url = c.entity_url;
    IF c.status = 'expired' THEN
        r.code := 'LEASE_EXPIRED';
        r.detail := format('claim %s expired; its work was handed on', c.id);
    ELSIF c.status <> 'active' OR d.active_claim_id IS DISTINCT FROM c.id THEN
        r.code := 'FENCED';
        r.detail := format('claim %s is %s; it no longer holds the entity', c.id, c.status);
    ELSIF d.active_lease_expires_at <= now() THEN
        r := pullwake_x_expire(r, c.entity_url, p_max_attempts);
        r.code := 'EXPIRED_NOW';
        r.detail := format('claim %s lease expired before this call', c.id);
    END IF;
    RETURN r;
END;
$$;

-- send: membership, idempotency (the same key with another payload is IDEMPOTENCY_MISMATCH),
-- a passed lease expired, the inbox append and the wake decision (queued, coalesced or held).
CREATE FUNCTION pullwake_send(
    p_url text, p_payload jsonb, p_bytes integer, p_key text, p_sender text,
    p_check_members boolean, p_max_attempts integer
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
    e record;
    prev record;
BEGIN
    SELECT en.status, en.created_by, en.members, d.active_claim_id, d.active_lease_expires_at
      INTO e
      FROM entities en JOIN dispatch_state d ON d.entity_url = en.url
     WHERE en.url = p_url FOR UPDATE OF en, d;
    IF NOT FOUND THEN
        r.code := 'NOT_FOUND'; r.detail := format('entity %s does not exist', p_url);
        RETURN r;
    END IF;
    IF p_check_members AND NOT (p_sender = e.created_by OR p_sender = ANY (e.members)
                                OR '*' = ANY (e.members)) THEN
        r.code := 'FORBIDDEN';
        r.detail := format('%s is not a member of entity %s', p_sender, p_url);
        RETURN r;
    END IF;
    IF p_key IS NOT NULL THEN
        SELECT m."offset", m.wake_id, m.wake_status, m.payload INTO prev FROM inbox_messages m
         WHERE m.entity_url = p_url AND m.idempotency_key = p_key;
        IF FOUND AND prev.payload IS DISTINCT FROM p_payload THEN
            r.code := 'IDEMPOTENCY_MISMATCH';
            r.detail := format('idempotency key %L was used for another payload (offset %s of %s)',
                               p_key, prev."offset", p_url);
            RETURN r;
        ELSIF FOUND THEN
            r.msg_offset := prev."offset"; r.wake_id := prev.wake_id;
            r.wake_status := prev.wake_status; r.duplicate := true;
            RETURN r;
        END IF;
    END IF;
    IF e.status IN ('stopped', 'killed') THEN
        r.code := 'ENTITY_NOT_RUNNABLE'; r.detail := format('entity %s is %s', p_url, e.status);
        RETURN r;
    END IF;
    IF e.active_claim_id IS NOT NULL AND e.active_lease_expires_at <= now() THEN
        r := pullwake_x_end_claim(r, p_url, 'expired', 'lease_expired', NULL, NULL,
                                  p_max_attempts);
    END IF;
    UPDATE dispatch_state SET tail_offset = tail_offset + 1, updated_at = now()
     WHERE entity_url = p_url RETURNING tail_offset INTO r.msg_offset;
    r := pullwake_x_maybe_wake(r, p_url, 'message');
    r.duplicate := false;
    IF r.pub_id IS NOT NULL THEN
        r.wake_id := r.pub_id; r.wake_status := 'queued';
    ELSE
        SELECT CASE WHEN d.active_claim_id IS NOT NULL THEN d.active_claim_id
                    ELSE d.outstanding_wake_id END,
               CASE WHEN d.active_claim_id IS NOT NULL OR d.outstanding_wake_id IS NOT NULL
                    THEN 'coalesced' ELSE 'held' END,
               CASE WHEN d.active_claim_id IS NOT NULL THEN 'active-claim'
                    WHEN d.outstanding_wake_id IS NOT NULL THEN 'outstanding-wake'
                    WHEN d.parked_reason IS NOT NULL THEN 'parked'
                    ELSE en.status END
          INTO r.wake_id, r.wake_status, r.wake_reason
          FROM dispatch_state d JOIN entities en ON en.url = d.entity_url
         WHERE d.entity_url = p_url;
    END IF;
    INSERT INTO inbox_messages (entity_url, "offset", payload, payload_bytes, sender,
                                idempotency_key, wake_id, wake_status)
    VALUES (p_url, r.msg_offset, p_payload, p_bytes, p_sender, p_key, r.wake_id, r.wake_status);
    RETURN r;
END;
$$;

-- Batch send: every entity of the batch is locked first, in URL order, so concurrent batches
-- never deadlock (single sends, claims and dones lock one entity each); then each item is a
-- pullwake_send, in the batch's order.
DROP FUNCTION pullwake_send_batch(text[], jsonb[], integer[], text[], text, boolean);
CREATE FUNCTION pullwake_send_batch(
    p_urls text[], p_payloads jsonb[], p_bytes integer[], p_keys text[], p_sender text,
    p_check_members boolean, p_max_attempts integer
) RETURNS TABLE (item integer, step pullwake_step) LANGUAGE plpgsql AS $$
DECLARE
    i integer;
BEGIN
    PERFORM 1 FROM entities en JOIN dispatch_state d ON d.entity_url = en.url
     WHERE en.url = ANY (p_urls) ORDER BY en.url FOR UPDATE OF en, d;
    FOR i IN 1 .. coalesce(array_length(p_urls, 1), 0) LOOP
        item := i - 1;
        step := pullwake_send(p_urls[i], p_payloads[i], p_bytes[i], p_keys[i], p_sender,
                              p_check_members, p_max_attempts);
        RETURN NEXT;
    END LOOP;
END;
$$;

-- claim: a runner turns its entity's outstanding wake into an active, leased claim, answered
-- with the first messages. p_owner (the runner's owner) must be the entity's creator.
CREATE FUNCTION pullwake_claim(
    p_runner_id text, p_wake_id text, p_entry_id text, p_owner text, p_token_hash text,
    p_lease_ms integer, p_max_msgs integer, p_max_bytes integer, p_max_attempts integer
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
    w wakes;
    e record;
BEGIN
    SELECT * INTO w FROM wakes WHERE id = p_wake_id;
    IF NOT FOUND OR w.runner_id IS DISTINCT FROM p_runner_id THEN
        r.code := 'NOT_FOUND'; r.entry_id := p_entry_id;
        r.detail := format('wake %L does not exist for runner %L', p_wake_id, p_runner_id);
        RETURN r;
    END IF;
    r.entry_id := coalesce(p_entry_id, w.stream_entry_id);
    SELECT en.status, en.created_by, d.outstanding_wake_id, d.active_claim_id,
           d.active_lease_expires_at, d.tail_offset, d.acked_offset
      INTO e
      FROM entities en JOIN dispatch_state d ON d.entity_url = en.url
     WHERE en.url = w.entity_url FOR UPDATE OF en, d;
    IF p_owner IS NOT NULL AND e.created_by <> p_owner THEN
        -- A runner target's entities are created by the runner's owner: an id that changed
        -- hands (possible only before ids were reserved for good) gains nothing, and the
        -- entity is parked rather than woken for the new owner again and again.
        PERFORM pullwake_x_supersede(w.entity_url, 'runner changed owner');
        UPDATE dispatch_state
           SET parked_reason = format('runner %L now belongs to another principal', p_runner_id),
               updated_at = now()
         WHERE entity_url = w.entity_url;
        r.code := 'NO_WORK'; r.detail := 'the entity belongs to the runner''s previous owner';
        RETURN r;
    END IF;
    IF e.outstanding_wake_id IS DISTINCT FROM p_wake_id THEN
        IF e.active_claim_id IS NOT NULL AND e.active_lease_expires_at <= now() THEN
            -- The holder died; hand the work on now rather than at the next sweep.
            r := pullwake_x_expire(r, w.entity_url, p_max_attempts);
            r.code := 'NO_WORK'; r.detail := 'wake is no longer outstanding';
        ELSIF e.active_claim_id IS NOT NULL THEN
            r.code := 'ALREADY_CLAIMED'; r.claim_id := e.active_claim_id;
            r.detail := format('entity %s is already claimed (claim %s)', w.entity_url,
                               e.active_claim_id);
        ELSIF e.status IN ('stopped', 'killed', 'paused') THEN
            r.code := 'NOT_RUNNABLE'; r.status := e.status;
        ELSE
            r.code := 'NO_WORK'; r.detail := 'wake is no longer outstanding';
        END IF;
        RETURN r;
    END IF;
    IF e.status IN ('stopped', 'killed', 'paused') THEN
        PERFORM pullwake_x_supersede(w.entity_url, 'entity ' || e.status);
        r.code := 'NOT_RUNNABLE'; r.status := e.status;
        RETURN r;
    END IF;
    IF e.tail_offset <= e.acked_offset THEN
        PERFORM pullwake_x_supersede(w.entity_url, 'no pending work');
        r.code := 'NO_WORK'; r.detail := 'no pending work';
        RETURN r;
    END IF;
    RETURN pullwake_x_activate(r, w.entity_url, p_wake_id, p_runner_id, p_token_hash,
                               p_lease_ms, p_max_msgs, p_max_bytes, true);
END;
$$;

-- heartbeat: the live holder extends its lease.
CREATE FUNCTION pullwake_heartbeat(
    p_claim_id text, p_token_hash text, p_epoch bigint, p_lease_ms integer,
    p_max_attempts integer
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
BEGIN
    r := pullwake_x_holder(r, p_claim_id, p_token_hash, p_epoch);
    IF r.code IS NULL THEN
        r := pullwake_x_check_active(r, p_claim_id, p_max_attempts);
    END IF;
    IF r.code IS NOT NULL THEN
        RETURN r;
    END IF;
    UPDATE claims SET last_heartbeat_at = now(),
           lease_expires_at = now() + p_lease_ms * interval '1 millisecond'
     WHERE id = p_claim_id RETURNING lease_expires_at INTO r.lease_expires_at;
    UPDATE dispatch_state SET active_lease_expires_at = r.lease_expires_at, updated_at = now()
     WHERE entity_url = r.url;
    SELECT status INTO r.status FROM entities WHERE url = r.url;
    RETURN r;
END;
$$;

-- done: ack up to p_acked, release, and wake again when work remains; with p_claim_next (and
-- the runner still enabled and its entities' owner) the holder gets the follow-up claim itself
-- (token p_next_token_hash) instead of a wake through the stream. A retried done answers what
-- the first one did (and hands an unused chained claim over again, with the new token).
CREATE FUNCTION pullwake_done(
    p_claim_id text, p_token_hash text, p_epoch bigint, p_acked bigint, p_claim_next boolean,
    p_next_token_hash text, p_lease_ms integer, p_max_msgs integer, p_max_bytes integer,
    p_max_attempts integer
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
    c claims;
    d record;
    v_chain boolean;
    v_left integer;
BEGIN
    r := pullwake_x_holder(r, p_claim_id, p_token_hash, p_epoch);
    IF r.code IS NOT NULL THEN
        RETURN r;
    END IF;
    SELECT * INTO c FROM claims WHERE id = p_claim_id;
    SELECT ds.*, en.created_by INTO d
      FROM dispatch_state ds JOIN entities en ON en.url = ds.entity_url
     WHERE ds.entity_url = c.entity_url;
    IF c.status = 'released' AND c.end_reason = 'done' AND c.acked_offset = p_acked THEN
        r.next_wake := coalesce(c.next_wake, false);
        IF p_claim_next AND d.active_claim_id IS NOT NULL AND d.active_epoch = c.epoch + 1
           AND d.active_lease_expires_at > now()
           AND EXISTS (
               SELECT 1 FROM claims nc JOIN wakes nw ON nw.id = nc.id
                WHERE nc.id = d.active_claim_id AND nc.status = 'active'
                  AND nw.reason = 'chained' AND nc.last_heartbeat_at IS NULL
                  AND NOT EXISTS (SELECT 1 FROM entity_events ev
                                   WHERE ev.entity_url = nc.entity_url
                                     AND ev.claim_id = nc.id)) THEN
            -- Its answer was lost and nobody used the chained claim: hand it over again with
            -- a fresh token (the lost one stops working) and the lease it has left.
            UPDATE claims SET token_hash = p_next_token_hash WHERE id = d.active_claim_id;
            UPDATE dispatch_state SET active_token_hash = p_next_token_hash
             WHERE entity_url = c.entity_url;
            v_left := greatest(
                (extract(epoch FROM d.active_lease_expires_at - now()) * 1000)::integer, 1);
            r.lease_ms := v_left;
            r := pullwake_x_claim_view(r, c.entity_url, p_max_msgs, p_max_bytes);
        END IF;
        RETURN r;
    END IF;
    r := pullwake_x_check_active(r, p_claim_id, p_max_attempts);
    IF r.code IS NOT NULL THEN
        RETURN r;
    END IF;
    IF p_acked > d.tail_offset OR p_acked < d.acked_offset THEN
        r.code := 'INVALID_OFFSET';
        r.acked_offset := d.acked_offset; r.tail_offset := d.tail_offset;
        r.detail := CASE WHEN p_acked > d.tail_offset
            THEN format('acked_offset %s is past the inbox tail %s', p_acked, d.tail_offset)
            ELSE format('acked_offset %s is behind the already acked offset %s', p_acked,
                        d.acked_offset) END;
        RETURN r;
    END IF;
    v_chain := p_claim_next AND (c.runner_id IS NULL OR EXISTS (
        SELECT 1 FROM runners ru WHERE ru.id = c.runner_id AND ru.admin_status = 'enabled'
           AND ru.owner_principal = d.created_by));
    r := pullwake_x_end_claim(r, c.entity_url, 'released', 'done', p_acked, NULL,
                              p_max_attempts);
    r := pullwake_x_maybe_wake(r, c.entity_url, CASE WHEN v_chain THEN 'chained'
                                                     ELSE 'follow_up' END);
    r.next_wake := r.pub_id IS NOT NULL;
    IF r.pub_id IS NOT NULL AND v_chain THEN
        -- Never published: the holder claims the follow-up in this same call.
        r := pullwake_x_activate(r, c.entity_url, r.pub_id, c.runner_id, p_next_token_hash,
                                 p_lease_ms, p_max_msgs, p_max_bytes, true);
        r.pub_id := NULL;
    END IF;
    RETURN r;
END;
$$;

-- release: the holder gives the claim up without acking; a new wake when work remains.
CREATE FUNCTION pullwake_release(
    p_claim_id text, p_token_hash text, p_epoch bigint, p_error text, p_max_attempts integer
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
BEGIN
    r := pullwake_x_holder(r, p_claim_id, p_token_hash, p_epoch);
    IF r.code IS NULL THEN
        r := pullwake_x_check_active(r, p_claim_id, p_max_attempts);
    END IF;
    IF r.code IS NOT NULL THEN
        RETURN r;
    END IF;
    r := pullwake_x_end_claim(r, r.url, 'released', 'release', NULL, p_error, p_max_attempts);
    r := pullwake_x_maybe_wake(r, r.url, 'released');
    r.next_wake := r.pub_id IS NOT NULL;
    RETURN r;
END;
$$;

-- event: a fenced append to the events log, by the live holder of the claim token.
CREATE FUNCTION pullwake_event(
    p_token_hash text, p_url text, p_payload jsonb, p_epoch bigint, p_max_attempts integer
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
    c claims;
BEGIN
    SELECT * INTO c FROM claims WHERE token_hash = p_token_hash;
    IF NOT FOUND THEN
        r.code := 'FENCED'; r.detail := 'claim token is unknown or no longer valid';
        RETURN r;
    END IF;
    IF c.entity_url <> p_url THEN
        r.code := 'FORBIDDEN';
        r.detail := format('this claim token is for %s, not %s', c.entity_url, p_url);
        RETURN r;
    END IF;
    r := pullwake_x_holder(r, c.id, p_token_hash, coalesce(p_epoch, c.epoch));
    IF r.code IS NULL THEN
        r := pullwake_x_check_active(r, c.id, p_max_attempts);
    END IF;
    IF r.code IS NOT NULL THEN
        RETURN r;
    END IF;
    UPDATE dispatch_state SET events_tail_offset = events_tail_offset + 1, updated_at = now()
     WHERE entity_url = p_url RETURNING events_tail_offset INTO r.msg_offset;
    INSERT INTO entity_events (entity_url, "offset", payload, sender, claim_id)
    VALUES (p_url, r.msg_offset, p_payload, 'claim:' || c.id, c.id);
    r.claim_id := c.id;
    RETURN r;
END;
$$;

-- signal: pause | resume | stop | kill, by the entity's creator.
CREATE FUNCTION pullwake_signal(
    p_url text, p_principal text, p_signal text, p_max_attempts integer
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
    e record;
    v_status text;
BEGIN
    SELECT en.status, en.created_by, d.active_claim_id INTO e
      FROM entities en JOIN dispatch_state d ON d.entity_url = en.url
     WHERE en.url = p_url FOR UPDATE OF en, d;
    IF NOT FOUND THEN
        r.code := 'NOT_FOUND'; r.detail := format('entity %s does not exist', p_url);
        RETURN r;
    END IF;
    IF p_principal IS NOT NULL AND e.created_by <> p_principal THEN
        r.code := 'FORBIDDEN';
        r.detail := format('only the creator (%s) may signal %s', e.created_by, p_url);
        RETURN r;
    END IF;
    IF e.status IN ('stopped', 'killed') AND p_signal <> 'kill' THEN
        r.code := 'ENTITY_NOT_RUNNABLE';
        r.detail := format('entity is %s; only kill is accepted', e.status);
        RETURN r;
    END IF;
    v_status := CASE p_signal
        -- a stop in progress wins: pausing a stopping entity would resurrect it on resume
        WHEN 'pause' THEN CASE WHEN e.status = 'stopping' THEN 'stopping' ELSE 'paused' END
        WHEN 'resume' THEN CASE WHEN e.status = 'stopping' THEN 'stopping'
                                WHEN e.active_claim_id IS NOT NULL THEN 'running'
                                ELSE 'idle' END
        WHEN 'stop' THEN CASE WHEN e.active_claim_id IS NOT NULL THEN 'stopping'
                              ELSE 'stopped' END
        ELSE 'killed' END;
    IF p_signal <> 'resume' THEN
        PERFORM pullwake_x_supersede(p_url, 'entity ' || p_signal);
    END IF;
    IF p_signal = 'kill' AND e.active_claim_id IS NOT NULL THEN
        r := pullwake_x_end_claim(r, p_url, 'failed', 'signal:kill', NULL, NULL,
                                  p_max_attempts);
    END IF;
    IF p_signal = 'resume' THEN
        UPDATE dispatch_state SET parked_reason = NULL, failed_attempts = 0, updated_at = now()
         WHERE entity_url = p_url;
    END IF;
    UPDATE entities SET status = v_status, updated_at = now()
     WHERE url = p_url AND status <> v_status;
    RETURN pullwake_x_maybe_wake(r, p_url, p_signal);
END;
$$;

-- The lease sweep: expire up to p_limit claims whose lease passed and hand their work on, one
-- row per expired claim. Concurrent workers skip each other's rows.
CREATE FUNCTION pullwake_expire_leases(p_limit integer, p_max_attempts integer)
RETURNS SETOF pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    v_url text;
    r pullwake_step;
BEGIN
    FOR v_url IN
        SELECT d.entity_url FROM dispatch_state d JOIN entities en ON en.url = d.entity_url
         WHERE d.active_claim_id IS NOT NULL AND d.active_lease_expires_at <= now()
         ORDER BY d.active_lease_expires_at LIMIT p_limit
           FOR UPDATE OF en, d SKIP LOCKED
    LOOP
        r := NULL;
        r := pullwake_x_expire(r, v_url, p_max_attempts);
        r.url := v_url;
        RETURN NEXT r;
    END LOOP;
END;
$$;

-- A wake for an entity that may have waited (its runner came back or was enabled again).
CREATE FUNCTION pullwake_wake_entity(p_url text, p_reason text) RETURNS pullwake_step
LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
BEGIN
    PERFORM 1 FROM entities en JOIN dispatch_state d ON d.entity_url = en.url
     WHERE en.url = p_url FOR UPDATE OF en, d;
    IF NOT FOUND THEN
        r.code := 'NOT_FOUND'; r.detail := format('entity %s does not exist', p_url);
        RETURN r;
    END IF;
    RETURN pullwake_x_maybe_wake(r, p_url, p_reason);
END;
$$;

-- A runner is deleted: its claim on the entity is released, the wake waiting for it retired.
CREATE FUNCTION pullwake_detach_runner(p_url text, p_runner_id text, p_max_attempts integer)
RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
    e record;
BEGIN
    SELECT en.target_runner_id, d.active_claim_id, d.active_runner_id INTO e
      FROM entities en JOIN dispatch_state d ON d.entity_url = en.url
     WHERE en.url = p_url FOR UPDATE OF en, d;
    IF NOT FOUND THEN
        r.code := 'NOT_FOUND'; r.detail := format('entity %s does not exist', p_url);
        RETURN r;
    END IF;
    IF e.active_claim_id IS NOT NULL AND e.active_runner_id = p_runner_id THEN
        r := pullwake_x_end_claim(r, p_url, 'released', 'runner_deleted', NULL, NULL,
                                  p_max_attempts);
    END IF;
    IF e.target_runner_id = p_runner_id THEN
        PERFORM pullwake_x_supersede(p_url, 'runner deleted');
    END IF;
    RETURN r;
END;
$$;

-- The worker claims a webhook wake on the target's behalf; a retry of the same wake re-issues
-- the claim with a new token (the previous attempt's token stops working).
CREATE FUNCTION pullwake_claim_webhook(
    p_wake_id text, p_token_hash text, p_lease_ms integer, p_max_msgs integer,
    p_max_bytes integer, p_max_attempts integer
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
    w wakes;
    e record;
BEGIN
    SELECT * INTO w FROM wakes WHERE id = p_wake_id;
    IF NOT FOUND OR w.target ->> 'type' IS DISTINCT FROM 'webhook' THEN
        r.code := 'NO_WORK'; r.detail := 'not a webhook wake';
        RETURN r;
    END IF;
    SELECT en.status, d.outstanding_wake_id, d.active_claim_id, d.active_lease_expires_at,
           d.tail_offset, d.acked_offset
      INTO e
      FROM entities en JOIN dispatch_state d ON d.entity_url = en.url
     WHERE en.url = w.entity_url FOR UPDATE OF en, d;
    IF e.active_claim_id = p_wake_id AND e.active_lease_expires_at <= now() THEN
        -- Expire *and* hand the work on (epoch + 1), as the lease sweep would.
        r := pullwake_x_expire(r, w.entity_url, p_max_attempts);
        r.code := 'NO_WORK'; r.detail := 'lease expired between attempts';
        RETURN r;
    END IF;
    IF e.active_claim_id = p_wake_id AND w.delivery_status = 'delivered' THEN
        -- A job retried after a worker crash that followed a 2xx: the target holds the claim
        -- and its token; re-issuing would fence it and deliver twice.
        r.code := 'NO_WORK'; r.detail := 'already delivered; the target holds the claim';
        RETURN r;
    END IF;
    IF e.active_claim_id = p_wake_id THEN
        UPDATE claims SET token_hash = p_token_hash, last_heartbeat_at = now(),
               lease_expires_at = now() + p_lease_ms * interval '1 millisecond'
         WHERE id = p_wake_id AND status = 'active'
        RETURNING lease_expires_at INTO r.lease_expires_at;
        UPDATE dispatch_state SET active_token_hash = p_token_hash,
               active_lease_expires_at = r.lease_expires_at, updated_at = now()
         WHERE entity_url = w.entity_url;
        r.lease_ms := p_lease_ms;
        RETURN pullwake_x_claim_view(r, w.entity_url, p_max_msgs, p_max_bytes);
    END IF;
    IF e.outstanding_wake_id IS DISTINCT FROM p_wake_id THEN
        r.code := 'NO_WORK'; r.detail := 'wake is no longer outstanding';
        RETURN r;
    END IF;
    IF e.status IN ('stopped', 'killed', 'paused') THEN
        PERFORM pullwake_x_supersede(w.entity_url, 'entity ' || e.status);
        r.code := 'NOT_RUNNABLE'; r.status := e.status;
        RETURN r;
    END IF;
    IF e.tail_offset <= e.acked_offset THEN
        PERFORM pullwake_x_supersede(w.entity_url, 'no pending work');
        r.code := 'NO_WORK'; r.detail := 'no pending work';
        RETURN r;
    END IF;
    RETURN pullwake_x_activate(r, w.entity_url, p_wake_id, NULL, p_token_hash, p_lease_ms,
                               p_max_msgs, p_max_bytes, false);
END;
$$;

-- Dead letter: the wake failed, its claim failed, the entity is parked until resumed.
CREATE FUNCTION pullwake_fail_webhook(
    p_wake_id text, p_error text, p_attempts integer, p_max_attempts integer
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
    w wakes;
    v_active text;
BEGIN
    SELECT * INTO w FROM wakes WHERE id = p_wake_id;
    IF NOT FOUND THEN
        r.code := 'NOT_FOUND'; r.detail := format('wake %L does not exist', p_wake_id);
        RETURN r;
    END IF;
    SELECT d.active_claim_id INTO v_active
      FROM entities en JOIN dispatch_state d ON d.entity_url = en.url
     WHERE en.url = w.entity_url FOR UPDATE OF en, d;
    -- When the claim expired meanwhile and the work was handed on (a newer wake), only this
    -- wake's failure is recorded: the entity is not parked under the newer one.
    IF v_active = p_wake_id THEN
        r := pullwake_x_end_claim(r, w.entity_url, 'failed', 'webhook_failed', NULL, p_error,
                                  p_max_attempts);
        UPDATE dispatch_state
           SET parked_reason = format('webhook delivery failed after %s attempts: %s',
                                      p_attempts, p_error),
               updated_at = now()
         WHERE entity_url = w.entity_url;
    END IF;
    UPDATE wakes SET delivery_status = 'failed', last_error = p_error, resolved_at = now()
     WHERE id = p_wake_id;
    RETURN r;
END;
$$;
