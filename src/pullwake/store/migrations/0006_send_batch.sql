-- Batch send: many messages, for any number of entities, in one call (one round trip). Per item,
-- what a single send does: membership, idempotency (the same key with another payload is
-- IDEMPOTENCY_MISMATCH), the wake decision and the inbox append.
-- Every entity of the batch is locked first, in URL order, so concurrent batches never deadlock
-- (single sends, claims and dones lock one entity each). Unlike a single send, a claim whose
-- lease passed is not expired here: the message coalesces into it and the lease sweep re-wakes
-- the entity within one recovery interval.
CREATE FUNCTION pullwake_send_batch(
    p_urls text[], p_payloads jsonb[], p_bytes integer[], p_keys text[], p_sender text,
    p_check_members boolean
) RETURNS TABLE (
    item integer, code text, msg_offset bigint, wake_id text, wake_status text,
    wake_reason text, duplicate boolean, new_wake boolean, wake_epoch bigint,
    wake_created_at timestamptz, runner_id text, target_type text
) LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    e record;
    prev record;
BEGIN
    PERFORM 1 FROM entities en JOIN dispatch_state d ON d.entity_url = en.url
    WHERE en.url = ANY (p_urls) ORDER BY en.url FOR UPDATE OF en, d;
    FOR i IN 1 .. coalesce(array_length(p_urls, 1), 0) LOOP
        item := i - 1;
        code := NULL; msg_offset := NULL; wake_id := NULL; wake_status := NULL;
        wake_reason := NULL; duplicate := false; new_wake := false; wake_epoch := NULL;
        wake_created_at := NULL; runner_id := NULL; target_type := NULL;
        SELECT en.status, en.created_by, en.members, en.dispatch_policy, en.target_runner_id,
               d.tail_offset, d.epoch, d.outstanding_wake_id, d.active_claim_id, d.parked_reason
          INTO e
          FROM entities en JOIN dispatch_state d ON d.entity_url = en.url
         WHERE en.url = p_urls[i];
        IF NOT FOUND THEN
            code := 'NOT_FOUND'; RETURN NEXT; CONTINUE;
        END IF;
        IF p_check_members AND NOT (p_sender = e.created_by OR p_sender = ANY (e.members)
                                    OR '*' = ANY (e.members)) THEN
            code := 'FORBIDDEN'; RETURN NEXT; CONTINUE;
        END IF;
        IF p_keys[i] IS NOT NULL THEN
            SELECT m."offset", m.wake_id, m.wake_status, m.payload INTO prev FROM inbox_messages m
             WHERE m.entity_url = p_urls[i] AND m.idempotency_key = p_keys[i];
            IF FOUND AND prev.payload IS DISTINCT FROM p_payloads[i] THEN
                code := 'IDEMPOTENCY_MISMATCH'; RETURN NEXT; CONTINUE;
            ELSIF FOUND THEN
                msg_offset := prev."offset"; wake_id := prev.wake_id;
                wake_status := prev.wake_status; duplicate := true;
                RETURN NEXT; CONTINUE;
            END IF;
        END IF;
        IF e.status IN ('stopped', 'killed') THEN
            code := 'ENTITY_NOT_RUNNABLE'; RETURN NEXT; CONTINUE;
        END IF;
        msg_offset := e.tail_offset + 1;
        IF e.status IN ('idle', 'running') AND e.parked_reason IS NULL
           AND e.outstanding_wake_id IS NULL AND e.active_claim_id IS NULL THEN
            new_wake := true;
            wake_id := 'wk_' || lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0')
                       || substr(replace(gen_random_uuid()::text, '-', ''), 1, 16);
            wake_status := 'queued'; wake_epoch := e.epoch + 1; wake_created_at := now();
            runner_id := e.target_runner_id;
            target_type := e.dispatch_policy -> 'targets' -> 0 ->> 'type';
            INSERT INTO wakes (id, entity_url, epoch, target, runner_id, reason)
            VALUES (wake_id, p_urls[i], wake_epoch, e.dispatch_policy -> 'targets' -> 0,
                    e.target_runner_id, 'message');
            UPDATE dispatch_state SET tail_offset = msg_offset, epoch = wake_epoch,
                   outstanding_wake_id = wake_id, outstanding_wake_created_at = now(),
                   last_wake_id = wake_id, updated_at = now()
             WHERE entity_url = p_urls[i];
        ELSE
            IF e.active_claim_id IS NOT NULL THEN
                wake_id := e.active_claim_id; wake_status := 'coalesced'; wake_reason := 'active-claim';
            ELSIF e.outstanding_wake_id IS NOT NULL THEN
                wake_id := e.outstanding_wake_id; wake_status := 'coalesced';
                wake_reason := 'outstanding-wake';
            ELSE
                wake_status := 'held';
                wake_reason := CASE WHEN e.parked_reason IS NOT NULL THEN 'parked' ELSE e.status END;
            END IF;
            UPDATE dispatch_state SET tail_offset = msg_offset, updated_at = now()
             WHERE entity_url = p_urls[i];
        END IF;
        INSERT INTO inbox_messages (entity_url, "offset", payload, payload_bytes, sender,
                                    idempotency_key, wake_id, wake_status)
        VALUES (p_urls[i], msg_offset, p_payloads[i], p_bytes[i], p_sender, p_keys[i],
                wake_id, wake_status);
        RETURN NEXT;
    END LOOP;
END;
$$;
