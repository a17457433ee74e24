-- Many sends in one call, for any number of entities and senders: the batch endpoint, and the
-- API process combining the single sends that arrive while one is in flight.
--
-- Each item answers exactly what pullwake_send would have answered had the items been sent one
-- after the other (the differential tests check this). Per entity, items run in batch order:
-- until one is appended each is a full pullwake_send (it may expire a passed lease and decide the
-- wake); after that nothing a send could change remains open (now() is fixed in a transaction,
-- so no lease passes later; status only moved through that expiry; the wake decision is taken),
-- and the entity's remaining items only need the membership, idempotency and status checks: they
-- are appended together, one UPDATE of the tail and one INSERT per entity, instead of five or six
-- statements per item.

-- The fast path's appends of one entity: the new tail and the messages.
CREATE FUNCTION pullwake_x_append_many(
    p_url text, p_tail bigint, p_offsets bigint[], p_items integer[], p_payloads jsonb[],
    p_bytes integer[], p_senders text[], p_keys text[], p_wake_id text, p_wake_status text
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(array_length(p_offsets, 1), 0) = 0 THEN
        RETURN;
    END IF;
    UPDATE dispatch_state SET tail_offset = p_tail, updated_at = now() WHERE entity_url = p_url;
    INSERT INTO inbox_messages (entity_url, "offset", payload, payload_bytes, sender,
                                idempotency_key, wake_id, wake_status)
    SELECT p_url, t.o, p_payloads[t.k], p_bytes[t.k], p_senders[t.k], p_keys[t.k], p_wake_id,
           p_wake_status
      FROM unnest(p_offsets, p_items) AS t(o, k);
END;
$$;

CREATE FUNCTION pullwake_send_many(
    p_urls text[], p_payloads jsonb[], p_bytes integer[], p_keys text[], p_senders text[],
    p_check_members boolean[], p_max_attempts integer
) RETURNS TABLE (item integer, step pullwake_step) LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
    i integer;
    j integer;
    v_url text;
    v_group text;
    v_fast boolean := false;
    v_tail bigint;
    e record;
    prev record;
    a_offsets bigint[] := '{}';
    a_items integer[] := '{}';
BEGIN
    -- Every entity of the call, locked in URL order: concurrent calls never deadlock (single
    -- sends, claims and dones lock one entity each).
    PERFORM 1 FROM entities en JOIN dispatch_state d ON d.entity_url = en.url
     WHERE en.url = ANY (p_urls) ORDER BY en.url FOR UPDATE OF en, d;
    FOR i, v_url IN
        SELECT t.k::integer, t.u FROM unnest(p_urls) WITH ORDINALITY AS t(u, k) ORDER BY t.u, t.k
    LOOP
        IF v_group IS DISTINCT FROM v_url THEN
            IF v_fast THEN
                PERFORM pullwake_x_append_many(v_group, v_tail, a_offsets, a_items, p_payloads,
                                               p_bytes, p_senders, p_keys, e.wake_id,
                                               e.wake_status);
            END IF;
            v_group := v_url; v_fast := false; a_offsets := '{}'; a_items := '{}';
        END IF;
        item := i - 1;
        IF NOT v_fast THEN
            r := pullwake_send(v_url, p_payloads[i], p_bytes[i], p_keys[i], p_senders[i],
                               p_check_members[i], p_max_attempts);
            step := r;
            RETURN NEXT;
            IF r.code IS NULL AND NOT r.duplicate THEN
                -- Appended: from here on every item of this entity coalesces or is held as
                -- this answer says (pullwake_send's own, for a send that did not wake).
                v_fast := true; v_tail := r.msg_offset;
                SELECT en.status, en.created_by, en.members,
                       CASE WHEN d.active_claim_id IS NOT NULL THEN d.active_claim_id
                            ELSE d.outstanding_wake_id END AS wake_id,
                       CASE WHEN d.active_claim_id IS NOT NULL OR d.outstanding_wake_id IS NOT NULL
                            THEN 'coalesced' ELSE 'held' END AS wake_status,
                       CASE WHEN d.active_claim_id IS NOT NULL THEN 'active-claim'
                            WHEN d.outstanding_wake_id IS NOT NULL THEN 'outstanding-wake'
                            WHEN d.parked_reason IS NOT NULL THEN 'parked'
                            ELSE en.status END AS wake_reason
                  INTO e
                  FROM dispatch_state d JOIN entities en ON en.url = d.entity_url
                 WHERE d.entity_url = v_url;
            END IF;
            CONTINUE;
        END IF;
        r := NULL;
        IF p_check_members[i] AND NOT (p_senders[i] = e.created_by OR p_senders[i] = ANY (e.members)
                                       OR '*' = ANY (e.members)) THEN
            r.code := 'FORBIDDEN';
            r.detail := format('%s is not a member of entity %s', p_senders[i], v_url);
            step := r;
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF p_keys[i] IS NOT NULL THEN
            -- An earlier item of this call (not inserted yet), else a stored message.
            SELECT t.k INTO j FROM unnest(a_items) AS t(k) WHERE p_keys[t.k] = p_keys[i] LIMIT 1;
            IF j IS NOT NULL THEN
                SELECT a_offsets[array_position(a_items, j)] AS "offset", e.wake_id,
                       e.wake_status, p_payloads[j] AS payload
                  INTO prev;
            ELSE
                SELECT m."offset", m.wake_id, m.wake_status, m.payload INTO prev
                  FROM inbox_messages m
                 WHERE m.entity_url = v_url AND m.idempotency_key = p_keys[i];
            END IF;
            IF prev."offset" IS NOT NULL THEN
                IF prev.payload IS DISTINCT FROM p_payloads[i] THEN
                    r.code := 'IDEMPOTENCY_MISMATCH';
                    r.detail := format(
                        'idempotency key %L was used for another payload (offset %s of %s)',
                        p_keys[i], prev."offset", v_url);
                ELSE
                    r.msg_offset := prev."offset"; r.wake_id := prev.wake_id;
                    r.wake_status := prev.wake_status; r.duplicate := true;
                END IF;
                step := r;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        IF e.status IN ('stopped', 'killed') THEN
            r.code := 'ENTITY_NOT_RUNNABLE';
            r.detail := format('entity %s is %s', v_url, e.status);
            step := r;
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_tail := v_tail + 1;
        a_offsets := a_offsets || v_tail;
        a_items := a_items || i;
        r.msg_offset := v_tail; r.wake_id := e.wake_id; r.wake_status := e.wake_status;
        r.wake_reason := e.wake_reason; r.duplicate := false;
        step := r;
        RETURN NEXT;
    END LOOP;
    IF v_fast THEN
        PERFORM pullwake_x_append_many(v_group, v_tail, a_offsets, a_items, p_payloads, p_bytes,
                                       p_senders, p_keys, e.wake_id, e.wake_status);
    END IF;
END;
$$;

-- The batch endpoint: one sender for every item.
CREATE OR REPLACE FUNCTION pullwake_send_batch(
    p_urls text[], p_payloads jsonb[], p_bytes integer[], p_keys text[], p_sender text,
    p_check_members boolean, p_max_attempts integer
) RETURNS TABLE (item integer, step pullwake_step) LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(array_length(p_urls, 1), 0);
BEGIN
    RETURN QUERY
    SELECT s.item, s.step
      FROM pullwake_send_many(p_urls, p_payloads, p_bytes, p_keys, array_fill(p_sender, ARRAY[n]),
                              array_fill(p_check_members, ARRAY[n]), p_max_attempts) AS s
     ORDER BY s.item;
END;
$$;
