-- W3C trace context per message (OpenTelemetry): a send may carry a `traceparent`, which is
-- kept with the message and handed to whoever claims it, so the claim's span joins the trace
-- the send began. Untraced sends call the functions of 0007/0009 unchanged; a traced send calls
-- the overloads below, which run the same send and then record the context of the messages it
-- appended (one more UPDATE, for traced sends only). pullwake_x_claim_view is as in 0007, plus
-- the messages' contexts (msg_traces).
ALTER TABLE inbox_messages ADD COLUMN traceparent text;
ALTER TYPE pullwake_step ADD ATTRIBUTE msg_traces text[];

CREATE FUNCTION pullwake_send(
    p_url text, p_payload jsonb, p_bytes integer, p_key text, p_sender text,
    p_check_members boolean, p_max_attempts integer, p_traceparent text
) RETURNS pullwake_step LANGUAGE plpgsql AS $$
DECLARE
    r pullwake_step;
BEGIN
    r := pullwake_send(p_url, p_payload, p_bytes, p_key, p_sender, p_check_members,
                       p_max_attempts);
    IF p_traceparent IS NOT NULL AND r.code IS NULL AND NOT r.duplicate THEN
        UPDATE inbox_messages SET traceparent = p_traceparent
         WHERE entity_url = p_url AND "offset" = r.msg_offset;
    END IF;
    RETURN r;
END;
$$;

CREATE FUNCTION pullwake_send_many(
    p_urls text[], p_payloads jsonb[], p_bytes integer[], p_keys text[], p_senders text[],
    p_check_members boolean[], p_max_attempts integer, p_traces text[]
) RETURNS TABLE (item integer, step pullwake_step) LANGUAGE plpgsql AS $$
DECLARE
    s record;
BEGIN
    -- pullwake_send_many has run to its end (a set-returning plpgsql function materializes
    -- its rows) before the first row comes back here, so every message it appends is stored.
    FOR s IN SELECT * FROM pullwake_send_many(p_urls, p_payloads, p_bytes, p_keys, p_senders,
                                              p_check_members, p_max_attempts)
    LOOP
        item := s.item; step := s.step;
        IF p_traces[item + 1] IS NOT NULL AND (step).code IS NULL AND NOT (step).duplicate THEN
            UPDATE inbox_messages SET traceparent = p_traces[item + 1]
             WHERE entity_url = p_urls[item + 1] AND "offset" = (step).msg_offset;
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- The claim as its holder sees it (as in 0007), with each message's trace context.
CREATE OR REPLACE FUNCTION pullwake_x_claim_view(
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
           CASE WHEN bool_or(m.traceparent IS NOT NULL)
                THEN array_agg(m.traceparent ORDER BY m."offset") END,
           max(m."offset")
      INTO r.msg_offsets, r.msg_payloads, r.msg_senders, r.msg_created_at, r.msg_traces, v_last
      FROM (SELECT i."offset", i.payload, i.sender, i.created_at, i.traceparent,
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
