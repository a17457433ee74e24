-- How long each ended claim was held (claim -> done, release, expiry), for the
-- pullwake_claim_to_done_seconds histogram: the step answers it with the claim it ended, so
-- measuring it costs no extra call. The rest of pullwake_x_end_claim is as in 0007.
ALTER TYPE pullwake_step ADD ATTRIBUTE held_s double precision;

CREATE OR REPLACE FUNCTION pullwake_x_end_claim(
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
           ds.outstanding_wake_id, ds.active_claim_id, ds.active_claimed_at, en.status
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
    r.held_s := greatest(extract(epoch FROM now() - d.active_claimed_at), 0);
    RETURN r;
END;
$$;
