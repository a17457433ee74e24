-- Named queries. Each "-- name: x" block is run by the store method of the same name.

-- name: token_insert
INSERT INTO principals_tokens (id, principal, token_hash, label)
VALUES ($1, $2, $3, $4)
RETURNING id, principal, label, created_at, last_used_at, revoked_at;

-- name: token_lookup
SELECT id, principal, last_used_at, revoked_at,
       last_used_at IS NULL OR last_used_at < now() - interval '60 seconds' AS touch_due
FROM principals_tokens WHERE token_hash = $1;

-- name: token_touch
UPDATE principals_tokens SET last_used_at = now() WHERE id = $1;

-- name: token_list
SELECT id, principal, label, created_at, last_used_at, revoked_at
FROM principals_tokens WHERE ($1::text IS NULL OR principal = $1) ORDER BY created_at;

-- name: token_revoke
UPDATE principals_tokens SET revoked_at = coalesce(revoked_at, now())
WHERE id = $1 RETURNING id, principal, label, created_at, last_used_at, revoked_at;

-- name: runner_get
SELECT r.id, r.owner_principal, r.label, r.kind, r.admin_status, r.created_at, r.updated_at,
       l.last_seen_at, l.lease_expires_at, l.diagnostics, now() AS now
FROM runners r LEFT JOIN runner_liveness l ON l.runner_id = r.id
WHERE r.id = $1;

-- name: runner_list
SELECT r.id, r.owner_principal, r.label, r.kind, r.admin_status, r.created_at, r.updated_at,
       l.last_seen_at, l.lease_expires_at, l.diagnostics, now() AS now
FROM runners r LEFT JOIN runner_liveness l ON l.runner_id = r.id
WHERE r.owner_principal = $1 ORDER BY r.id;

-- name: runner_id_reserve
-- The id's owner for good: the first registration reserves it, later ones lock and read it.
INSERT INTO runner_id_owners (id, owner_principal) VALUES ($1, $2)
ON CONFLICT (id) DO UPDATE SET id = EXCLUDED.id
RETURNING owner_principal;

-- name: runner_count_owned
SELECT count(*) FROM runners WHERE owner_principal = $1;

-- name: principal_lock
-- Serialises one principal's runner registrations (the runner cap is checked under it).
SELECT pg_advisory_xact_lock(hashtextextended('pullwake:principal:' || $1, 0));

-- name: runner_insert
INSERT INTO runners (id, owner_principal, label, kind) VALUES ($1, $2, $3, $4)
ON CONFLICT (id) DO NOTHING
RETURNING id;

-- name: runner_update_meta
UPDATE runners SET label = $3, kind = $4, updated_at = now()
WHERE id = $1 AND owner_principal = $2 RETURNING id;

-- name: runner_set_admin_status
UPDATE runners SET admin_status = $2, updated_at = now() WHERE id = $1 RETURNING id;

-- name: runner_delete
DELETE FROM runners WHERE id = $1 RETURNING id;

-- name: runner_liveness_upsert
INSERT INTO runner_liveness (runner_id, last_seen_at, lease_expires_at, diagnostics)
VALUES ($1, now(), now() + $2::interval, $3)
ON CONFLICT (runner_id) DO UPDATE SET
    last_seen_at = now(),
    lease_expires_at = EXCLUDED.lease_expires_at,
    diagnostics = coalesce(EXCLUDED.diagnostics, runner_liveness.diagnostics)
RETURNING lease_expires_at;

-- name: runner_backlog
SELECT
    (SELECT count(*) FROM claims WHERE runner_id = $1 AND status = 'active') AS active_claims,
    (SELECT count(*) FROM wakes WHERE runner_id = $1 AND claim_status = 'unclaimed'
        AND delivery_status IN ('queued', 'delivered')) AS outstanding_wakes,
    (SELECT extract(epoch FROM now() - min(created_at)) * 1000 FROM wakes
        WHERE runner_id = $1 AND claim_status = 'unclaimed'
        AND delivery_status IN ('queued', 'delivered')) AS oldest_outstanding_ms,
    (SELECT count(*) FROM wakes WHERE runner_id = $1 AND delivery_status = 'queued'
        AND claim_status = 'unclaimed') AS undelivered_wakes,
    (SELECT count(*) FROM dispatch_state d JOIN entities e ON e.url = d.entity_url
        WHERE e.target_runner_id = $1 AND d.parked_reason IS NOT NULL) AS parked_entities;

-- name: runner_active_claim_entities
SELECT entity_url FROM claims WHERE runner_id = $1 AND status = 'active';

-- name: runner_outstanding_wakes
SELECT w.id, w.entity_url, w.epoch, w.reason, w.created_at, w.runner_id, w.stream_entry_id
FROM wakes w
WHERE w.runner_id = $1 AND w.claim_status = 'unclaimed' AND w.delivery_status IN ('queued', 'delivered')
ORDER BY w.created_at;

-- name: runner_idle_pending_entities
SELECT d.entity_url FROM dispatch_state d JOIN entities e ON e.url = d.entity_url
WHERE e.target_runner_id = $1 AND d.tail_offset > d.acked_offset
  AND d.outstanding_wake_id IS NULL AND d.active_claim_id IS NULL
  AND e.status IN ('idle', 'running') AND d.parked_reason IS NULL;

-- name: entity_type_upsert
-- Only the owner changes a type (a type from before owners existed goes to its next writer);
-- no row back means another principal owns it.
INSERT INTO entity_types (name, default_dispatch_policy, owner_principal) VALUES ($1, $2, $3)
ON CONFLICT (name) DO UPDATE SET default_dispatch_policy = EXCLUDED.default_dispatch_policy,
    owner_principal = EXCLUDED.owner_principal, updated_at = now()
WHERE entity_types.owner_principal IS NULL
   OR entity_types.owner_principal = EXCLUDED.owner_principal
RETURNING name, default_dispatch_policy, owner_principal, created_at, updated_at,
    (xmax = 0) AS inserted;

-- name: entity_type_get
SELECT name, default_dispatch_policy, owner_principal, created_at, updated_at
FROM entity_types WHERE name = $1;

-- name: entity_insert
INSERT INTO entities (url, type, id, dispatch_policy, target_runner_id, tags, created_by,
                      members)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (url) DO NOTHING RETURNING url;

-- name: dispatch_insert
INSERT INTO dispatch_state (entity_url) VALUES ($1);

-- name: entity_get
SELECT e.url, e.type, e.id, e.status, e.dispatch_policy, e.target_runner_id, e.tags, e.created_by,
       e.members, e.created_at, d.tail_offset, d.acked_offset, d.epoch, d.outstanding_wake_id,
       d.active_claim_id, d.active_runner_id, d.active_epoch, d.active_lease_expires_at,
       d.parked_reason, d.failed_attempts
FROM entities e JOIN dispatch_state d ON d.entity_url = e.url WHERE e.url = $1;

-- name: entity_set_members
-- Only the creator changes who else may read and send.
UPDATE entities SET members = $3, updated_at = now()
WHERE url = $1 AND created_by = $2 RETURNING url;

-- name: messages_after
SELECT "offset", payload, payload_bytes, sender, created_at, traceparent FROM inbox_messages
WHERE entity_url = $1 AND "offset" > $2 ORDER BY "offset" LIMIT $3;

-- name: events_after
SELECT "offset", payload, sender, claim_id, created_at FROM entity_events
WHERE entity_url = $1 AND "offset" > $2 ORDER BY "offset" LIMIT $3;

-- name: wake_get
SELECT id, entity_url, epoch, target, runner_id, reason, delivery_status, claim_status,
       stream_entry_id, attempts, last_error, created_at, delivered_at, claimed_at, resolved_at
FROM wakes WHERE id = $1;

-- name: wakes_mark_delivered
-- Published wakes ($1) and their stream entries ($2), recorded in one batch. Only a live wake
-- moves to delivered; a wake superseded or claimed meanwhile keeps its state.
UPDATE wakes w SET delivery_status = CASE WHEN w.delivery_status = 'queued' THEN 'delivered'
                                          ELSE w.delivery_status END,
    stream_entry_id = d.entry_id, delivered_at = now(), attempts = w.attempts + 1
FROM unnest($1::text[], $2::text[]) AS d(id, entry_id)
WHERE w.id = d.id;

-- name: wake_mark_publish_failed
UPDATE wakes SET last_error = $2, attempts = attempts + 1 WHERE id = $1;

-- name: claim_by_token
SELECT id, epoch, entity_url, runner_id, status, token_hash, lease_expires_at, now() AS now
FROM claims WHERE token_hash = $1;

-- name: schema_now
SELECT now();

-- name: entity_last_wakes
SELECT id, epoch, reason, delivery_status, claim_status, created_at FROM wakes
WHERE entity_url = $1 ORDER BY epoch DESC LIMIT $2;

-- name: stale_wakes_lock
-- Recovery: live unclaimed wakes never published (after $1) or not claimed since the last
-- publish (after $2); stamping delivered_at in the same transaction keeps workers from doubling.
-- Parked wakes (found unread, migration 0010) are left out: the wakes_redeliverable index.
SELECT id, entity_url, epoch, reason, created_at, runner_id, target, delivery_status,
       stream_entry_id
FROM wakes
WHERE claim_status = 'unclaimed' AND delivery_status IN ('queued', 'delivered')
  AND (parked_delivery_at IS NULL OR parked_delivery_at <> delivered_at)
  AND ((delivery_status = 'queued' AND coalesce(delivered_at, created_at) < now() - $1::interval)
    OR (delivery_status = 'delivered' AND delivered_at < now() - $2::interval))
ORDER BY created_at
LIMIT $3
FOR UPDATE SKIP LOCKED;

-- name: wake_stamp_redelivery
UPDATE wakes SET delivered_at = now() WHERE id = ANY($1::text[]);

-- name: wakes_park_unread
-- Re-delivery found these wakes' entries ($2) unread: park each while that publish stands.
UPDATE wakes w SET parked_delivery_at = w.delivered_at
FROM unnest($1::text[], $2::text[]) AS d(id, entry_id)
WHERE w.id = d.id AND w.stream_entry_id = d.entry_id
  AND w.claim_status = 'unclaimed' AND w.delivery_status = 'delivered';

-- name: wakes_unpark
-- The runner's stream shows a reader: re-delivery looks at these wakes again, from now on.
UPDATE wakes SET parked_delivery_at = NULL, delivered_at = now()
WHERE id = ANY($1::text[]) AND parked_delivery_at = delivered_at;

-- name: sweep_outstanding_wakes
-- The stream sweep's next slice: the live unclaimed wakes of the first $2 runners (by id) after
-- $1 that have any, oldest first per runner (the wakes_outstanding_by_runner index).
SELECT w.id, w.entity_url, w.epoch, w.reason, w.created_at, w.runner_id, w.stream_entry_id,
       coalesce(w.parked_delivery_at = w.delivered_at, false) AS parked
FROM wakes w
WHERE w.runner_id = ANY (ARRAY(
        SELECT DISTINCT runner_id FROM wakes
        WHERE runner_id > $1 AND claim_status = 'unclaimed'
          AND delivery_status IN ('queued', 'delivered')
        ORDER BY runner_id
        LIMIT $2))
  AND w.claim_status = 'unclaimed' AND w.delivery_status IN ('queued', 'delivered')
ORDER BY w.runner_id, w.created_at;

-- name: runners_outstanding_wakes
-- The live unclaimed wakes of the runners $1, oldest first per runner.
SELECT w.id, w.entity_url, w.epoch, w.reason, w.created_at, w.runner_id, w.stream_entry_id,
       coalesce(w.parked_delivery_at = w.delivered_at, false) AS parked
FROM wakes w
WHERE w.runner_id = ANY($1::text[]) AND w.claim_status = 'unclaimed'
  AND w.delivery_status IN ('queued', 'delivered')
ORDER BY w.runner_id, w.created_at;

-- name: runners_with_outstanding_wakes_count
SELECT count(DISTINCT runner_id) FROM wakes
WHERE runner_id IS NOT NULL AND claim_status = 'unclaimed'
  AND delivery_status IN ('queued', 'delivered');

-- name: runner_ids_after
SELECT id FROM runners WHERE id > $1 ORDER BY id LIMIT $2;

-- name: runner_count
SELECT count(*) FROM runners;

-- name: wake_is_wanted
SELECT EXISTS (SELECT 1 FROM dispatch_state WHERE outstanding_wake_id = $1);

-- name: wake_record_attempt
UPDATE wakes SET attempts = attempts + 1, last_error = $2,
    delivery_status = CASE WHEN $2::text IS NULL AND delivery_status = 'queued' THEN 'delivered'
                           ELSE delivery_status END,
    delivered_at = CASE WHEN $2::text IS NULL THEN now() ELSE delivered_at END
WHERE id = $1;

-- name: metrics_runners
-- The $1 runners with the most unclaimed wakes (then the oldest wake, then by id), one row
-- each; every other runner summed into one row per liveness state, with id NULL.
WITH backlog AS (
    SELECT w.runner_id, count(*) AS outstanding_wakes,
        extract(epoch FROM now() - min(w.created_at)) AS oldest_wake_age_s
    FROM wakes w
    WHERE w.runner_id IS NOT NULL AND w.claim_status = 'unclaimed'
      AND w.delivery_status IN ('queued', 'delivered')
    GROUP BY w.runner_id
), active AS (
    SELECT c.runner_id, count(*) AS active_claims FROM claims c
    WHERE c.status = 'active' AND c.runner_id IS NOT NULL
    GROUP BY c.runner_id
), ranked AS (
    SELECT r.id,
        CASE WHEN r.admin_status <> 'enabled' OR l.lease_expires_at IS NULL THEN 'offline'
             WHEN l.lease_expires_at > now() THEN 'online'
             ELSE 'expired' END AS liveness,
        coalesce(b.outstanding_wakes, 0) AS outstanding_wakes, b.oldest_wake_age_s,
        coalesce(a.active_claims, 0) AS active_claims,
        row_number() OVER (ORDER BY coalesce(b.outstanding_wakes, 0) DESC,
                           b.oldest_wake_age_s DESC NULLS LAST, r.id) AS rank
    FROM runners r
    LEFT JOIN runner_liveness l ON l.runner_id = r.id
    LEFT JOIN backlog b ON b.runner_id = r.id
    LEFT JOIN active a ON a.runner_id = r.id
)
SELECT CASE WHEN rank <= $1 THEN id END AS id, liveness, count(*)::integer AS runners,
    sum(outstanding_wakes)::integer AS outstanding_wakes,
    max(oldest_wake_age_s) AS oldest_wake_age_s, sum(active_claims)::integer AS active_claims
FROM ranked
GROUP BY 1, 2;

-- name: stuck_wakes
-- pullwake inspect stuck: live wakes still unclaimed $1 after their creation, oldest first;
-- $3 (the dashboard): only those of the entities that principal may see (NULL: every one).
SELECT w.id, w.entity_url, w.runner_id, w.target ->> 'type' AS target_type, w.epoch, w.reason,
    w.delivery_status, w.attempts, w.stream_entry_id,
    (w.parked_delivery_at IS NOT NULL AND w.parked_delivery_at = w.delivered_at) AS parked,
    extract(epoch FROM now() - w.created_at)::float8 AS age_s,
    extract(epoch FROM now() - w.delivered_at)::float8 AS delivered_age_s
FROM wakes w
WHERE w.claim_status = 'unclaimed' AND w.delivery_status IN ('queued', 'delivered')
  AND w.created_at < now() - $1::interval
  AND ($3::text IS NULL OR EXISTS (
      SELECT 1 FROM entities e WHERE e.url = w.entity_url
        AND (e.created_by = $3 OR $3 = ANY (e.members) OR '*' = ANY (e.members))))
ORDER BY w.created_at
LIMIT $2;

-- name: stuck_claims
-- pullwake inspect stuck: active claims whose lease passed or passes within $1, soonest first;
-- $3: only those of the entities that principal may see (NULL: every one).
SELECT c.id, c.entity_url, c.runner_id, c.epoch,
    extract(epoch FROM now() - c.claimed_at)::float8 AS held_s,
    extract(epoch FROM c.lease_expires_at - now())::float8 AS lease_left_s,
    extract(epoch FROM now() - c.last_heartbeat_at)::float8 AS heartbeat_age_s
FROM claims c
WHERE c.status = 'active' AND c.lease_expires_at < now() + $1::interval
  AND ($3::text IS NULL OR EXISTS (
      SELECT 1 FROM entities e WHERE e.url = c.entity_url
        AND (e.created_by = $3 OR $3 = ANY (e.members) OR '*' = ANY (e.members))))
ORDER BY c.lease_expires_at
LIMIT $2;

-- name: stuck_parked_entities
-- pullwake inspect stuck: entities whose dispatch is parked (poison work, a dead webhook); $2:
-- only those that principal may see (NULL: every one).
SELECT d.entity_url, e.status, d.parked_reason, d.failed_attempts,
    d.tail_offset - d.acked_offset AS pending_messages, e.target_runner_id, d.last_error,
    extract(epoch FROM now() - d.updated_at)::float8 AS since_s
FROM dispatch_state d JOIN entities e ON e.url = d.entity_url
WHERE d.parked_reason IS NOT NULL
  AND ($2::text IS NULL OR e.created_by = $2 OR $2 = ANY (e.members) OR '*' = ANY (e.members))
ORDER BY d.updated_at
LIMIT $1;

-- name: stuck_runners
-- pullwake inspect stuck: runners not online (lease passed, never seen, disabled) while wakes
-- wait for them, the longest waiting first; $2: only that principal's runners (NULL: all).
WITH backlog AS (
    SELECT w.runner_id, count(*)::integer AS outstanding_wakes,
        extract(epoch FROM now() - min(w.created_at))::float8 AS oldest_wake_age_s
    FROM wakes w
    WHERE w.runner_id IS NOT NULL AND w.claim_status = 'unclaimed'
      AND w.delivery_status IN ('queued', 'delivered')
    GROUP BY w.runner_id
)
SELECT r.id, r.admin_status,
    CASE WHEN r.admin_status <> 'enabled' OR l.lease_expires_at IS NULL THEN 'offline'
         ELSE 'expired' END AS liveness,
    extract(epoch FROM now() - l.lease_expires_at)::float8 AS expired_s,
    extract(epoch FROM now() - l.last_seen_at)::float8 AS seen_age_s,
    b.outstanding_wakes, b.oldest_wake_age_s
FROM backlog b
JOIN runners r ON r.id = b.runner_id
LEFT JOIN runner_liveness l ON l.runner_id = r.id
WHERE (r.admin_status <> 'enabled' OR l.lease_expires_at IS NULL OR l.lease_expires_at <= now())
  AND ($2::text IS NULL OR r.owner_principal = $2)
ORDER BY b.oldest_wake_age_s DESC, r.id
LIMIT $1;

-- name: metrics_entities
SELECT e.status, count(*) AS entities,
    count(*) FILTER (WHERE d.parked_reason IS NOT NULL) AS parked,
    count(*) FILTER (WHERE d.tail_offset > d.acked_offset) AS with_pending,
    coalesce(sum(d.tail_offset - d.acked_offset), 0) AS pending_messages
FROM entities e JOIN dispatch_state d ON d.entity_url = e.url
GROUP BY e.status;

-- name: metrics_dead_letters
SELECT count(*) FROM wakes WHERE delivery_status = 'failed';

-- name: prune_wakes
-- Retention: a batch of finished wakes resolved before the cutoff ($1 ago), with their ended
-- claims (claims.id is the wake id). Never an entity's outstanding wake, its active claim's wake
-- or its latest wake. Rows are locked SKIP LOCKED and dispatch_state is only read (never
-- locked): the hot path's `FOR UPDATE OF e, d` never waits here.
WITH doomed AS (
    SELECT w.id FROM wakes w
    WHERE w.resolved_at < now() - $1::interval
      AND NOT EXISTS (SELECT 1 FROM claims c WHERE c.id = w.id AND c.status = 'active')
      AND NOT EXISTS (SELECT 1 FROM dispatch_state d WHERE d.entity_url = w.entity_url
          AND w.id IN (d.outstanding_wake_id, d.active_claim_id, d.last_wake_id))
    ORDER BY w.resolved_at
    LIMIT $2
    FOR UPDATE OF w SKIP LOCKED
), gone_claims AS (
    DELETE FROM claims c USING doomed WHERE c.id = doomed.id RETURNING c.id
), gone_wakes AS (
    DELETE FROM wakes w USING doomed WHERE w.id = doomed.id RETURNING w.id
)
SELECT (SELECT count(*) FROM gone_wakes) AS wakes, (SELECT count(*) FROM gone_claims) AS claims;

-- name: prune_wakes_count
SELECT count(*) AS wakes, count(c.id) AS claims
FROM wakes w LEFT JOIN claims c ON c.id = w.id
WHERE w.resolved_at < now() - $1::interval
  AND (c.status IS NULL OR c.status <> 'active')
  AND NOT EXISTS (SELECT 1 FROM dispatch_state d WHERE d.entity_url = w.entity_url
      AND w.id IN (d.outstanding_wake_id, d.active_claim_id, d.last_wake_id));

-- name: prune_inbox_messages
-- Retention: a batch of acked messages older than the cutoff. acked_offset only grows, so the
-- unlocked read of dispatch_state can only under-count what is safe to delete.
WITH doomed AS (
    SELECT m.entity_url, m."offset" FROM inbox_messages m
    JOIN dispatch_state d ON d.entity_url = m.entity_url
    WHERE m.created_at < now() - $1::interval AND m."offset" <= d.acked_offset
    ORDER BY m.created_at
    LIMIT $2
    FOR UPDATE OF m SKIP LOCKED
), gone AS (
    DELETE FROM inbox_messages m USING doomed
    WHERE m.entity_url = doomed.entity_url AND m."offset" = doomed."offset" RETURNING 1
)
SELECT count(*) FROM gone;

-- name: prune_inbox_messages_count
SELECT count(*) FROM inbox_messages m JOIN dispatch_state d ON d.entity_url = m.entity_url
WHERE m.created_at < now() - $1::interval AND m."offset" <= d.acked_offset;

-- name: prune_entity_events
WITH doomed AS (
    SELECT entity_url, "offset" FROM entity_events
    WHERE created_at < now() - $1::interval
    ORDER BY created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM entity_events e USING doomed
    WHERE e.entity_url = doomed.entity_url AND e."offset" = doomed."offset" RETURNING 1
)
SELECT count(*) FROM gone;

-- name: prune_entity_events_count
SELECT count(*) FROM entity_events WHERE created_at < now() - $1::interval;
-- name: worker_status_record
INSERT INTO worker_status
    (worker_id, host, pid, interval_ms, redis_ok, failing_jobs, last_recovery_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (worker_id) DO UPDATE
SET seen_at = now(), redis_ok = EXCLUDED.redis_ok, failing_jobs = EXCLUDED.failing_jobs,
    last_recovery_at = EXCLUDED.last_recovery_at;

-- name: worker_status_prune
DELETE FROM worker_status WHERE seen_at < now() - $1::interval;

-- name: worker_status_remove
DELETE FROM worker_status WHERE worker_id = $1;

-- name: metrics_workers
-- A worker is silent when it missed about five probes (and at least 15 s).
SELECT worker_id, redis_ok, failing_jobs, last_recovery_at,
       extract(epoch FROM now() - seen_at)::float8 AS seen_age_s,
       seen_at < now() - greatest(interval '15 seconds', interval_ms * interval '5 ms') AS silent
FROM worker_status ORDER BY seen_at DESC LIMIT $1;

-- The state machine (migration 0007): one call per state change, one pullwake_step row back.

-- name: step_send
SELECT * FROM pullwake_send($1, $2, $3, $4, $5, $6, $7);

-- name: step_send_traced
-- A send with a W3C trace context for its message (migration 0012).
SELECT * FROM pullwake_send($1, $2, $3, $4, $5, $6, $7, $8);

-- name: step_send_batch
SELECT item, (step).* FROM pullwake_send_batch($1::text[], $2::jsonb[], $3::integer[],
                                               $4::text[], $5, $6, $7);

-- name: step_send_many
SELECT item, (step).* FROM pullwake_send_many($1::text[], $2::jsonb[], $3::integer[],
                                              $4::text[], $5::text[], $6::boolean[], $7);

-- name: step_send_many_traced
SELECT item, (step).* FROM pullwake_send_many($1::text[], $2::jsonb[], $3::integer[],
                                              $4::text[], $5::text[], $6::boolean[], $7,
                                              $8::text[]);

-- name: step_claim
SELECT * FROM pullwake_claim($1, $2, $3, $4, $5, $6, $7, $8, $9);

-- name: step_heartbeat
SELECT * FROM pullwake_heartbeat($1, $2, $3, $4, $5);

-- name: step_done
SELECT * FROM pullwake_done($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- name: step_release
SELECT * FROM pullwake_release($1, $2, $3, $4, $5);

-- name: step_event
SELECT * FROM pullwake_event($1, $2, $3, $4, $5);

-- name: step_signal
SELECT * FROM pullwake_signal($1, $2, $3, $4);

-- name: step_expire_leases
SELECT * FROM pullwake_expire_leases($1, $2);

-- name: step_wake_entity
SELECT * FROM pullwake_wake_entity($1, $2);

-- name: step_detach_runner
SELECT * FROM pullwake_detach_runner($1, $2, $3);

-- name: step_claim_webhook
SELECT * FROM pullwake_claim_webhook($1, $2, $3, $4, $5, $6);

-- name: step_fail_webhook
SELECT * FROM pullwake_fail_webhook($1, $2, $3, $4);

-- name: token_touch_batch
-- Records the use of cached tokens (at most about once a minute each), off the request path.
UPDATE principals_tokens SET last_used_at = now() WHERE id = ANY($1::text[]);

-- name: sse_access_check
-- The live tokens among $1 (an open stream uses its token: last_used_at moves, at most once a
-- minute, as for a request) and the runners among $2.
WITH live AS (
    SELECT id, token_hash, principal, last_used_at FROM principals_tokens
    WHERE token_hash = ANY($1::text[]) AND revoked_at IS NULL
), touched AS (
    UPDATE principals_tokens t SET last_used_at = now()
    FROM live
    WHERE t.id = live.id
      AND (live.last_used_at IS NULL OR live.last_used_at < now() - interval '60 seconds')
)
SELECT 't' AS kind, token_hash AS key, principal AS owner, NULL::text AS admin_status FROM live
UNION ALL
SELECT 'r', id, owner_principal, admin_status FROM runners WHERE id = ANY($2::text[]);

-- name: ui_overview
-- The dashboard's overview for principal $1, one statement: its runners by liveness; the live
-- wakes, active claims, parked entities and dead letters of the entities it may see; and their
-- sends, claims and dones in each of the last $3 buckets of $2 seconds (oldest first). Claims
-- are counted from their wakes (claimed_at of the wakes resolved since, through wakes_resolved,
-- plus the active claims), so no scan of the claims table.
WITH visible AS (
    SELECT e.url FROM entities e
    WHERE e.created_by = $1 OR e.members && ARRAY[$1::text, '*']
), live AS (
    SELECT CASE WHEN r.admin_status <> 'enabled' OR l.lease_expires_at IS NULL THEN 'offline'
                WHEN l.lease_expires_at > now() THEN 'online' ELSE 'expired' END AS liveness
    FROM runners r LEFT JOIN runner_liveness l ON l.runner_id = r.id
    WHERE r.owner_principal = $1
), since AS (
    SELECT now() - make_interval(secs => $2::integer * $3::integer) AS t
), buckets AS (
    SELECT n FROM generate_series(0, $3::integer - 1) AS n
), sends AS (
    SELECT floor(extract(epoch FROM m.created_at - s.t) / $2::integer)::integer AS n, count(*) AS c
    FROM since s, inbox_messages m JOIN visible v ON v.url = m.entity_url
    WHERE m.created_at >= s.t GROUP BY 1
), claimed AS (
    SELECT floor(extract(epoch FROM x.at - s.t) / $2::integer)::integer AS n, count(*) AS c
    FROM since s, (
        SELECT w.claimed_at AS at FROM since s2, wakes w JOIN visible v ON v.url = w.entity_url
        WHERE w.resolved_at >= s2.t AND w.claimed_at >= s2.t
        UNION ALL
        SELECT d.active_claimed_at FROM dispatch_state d JOIN visible v ON v.url = d.entity_url
        WHERE d.active_claim_id IS NOT NULL
    ) x
    WHERE x.at >= s.t GROUP BY 1
), dones AS (
    SELECT floor(extract(epoch FROM w.resolved_at - s.t) / $2::integer)::integer AS n, count(*) AS c
    FROM since s, wakes w JOIN visible v ON v.url = w.entity_url
    WHERE w.resolved_at >= s.t AND w.claim_status = 'completed' GROUP BY 1
)
SELECT
    (SELECT count(*) FROM live WHERE liveness = 'online')::integer AS runners_online,
    (SELECT count(*) FROM live WHERE liveness = 'expired')::integer AS runners_expired,
    (SELECT count(*) FROM live WHERE liveness = 'offline')::integer AS runners_offline,
    (SELECT count(*) FROM wakes w JOIN visible v ON v.url = w.entity_url
        WHERE w.claim_status = 'unclaimed' AND w.delivery_status IN ('queued', 'delivered')
    )::integer AS outstanding_wakes,
    (SELECT extract(epoch FROM now() - min(w.created_at))::float8
        FROM wakes w JOIN visible v ON v.url = w.entity_url
        WHERE w.claim_status = 'unclaimed' AND w.delivery_status IN ('queued', 'delivered')
    ) AS oldest_wake_age_s,
    (SELECT count(*) FROM dispatch_state d JOIN visible v ON v.url = d.entity_url
        WHERE d.active_claim_id IS NOT NULL)::integer AS active_claims,
    (SELECT count(*) FROM dispatch_state d JOIN visible v ON v.url = d.entity_url
        WHERE d.parked_reason IS NOT NULL)::integer AS parked_entities,
    (SELECT count(*) FROM wakes w JOIN visible v ON v.url = w.entity_url
        WHERE w.delivery_status = 'failed')::integer AS dead_letters,
    (SELECT array_agg(coalesce(x.c, 0)::integer ORDER BY b.n)
        FROM buckets b LEFT JOIN sends x USING (n)) AS sends,
    (SELECT array_agg(coalesce(x.c, 0)::integer ORDER BY b.n)
        FROM buckets b LEFT JOIN claimed x USING (n)) AS claims,
    (SELECT array_agg(coalesce(x.c, 0)::integer ORDER BY b.n)
        FROM buckets b LEFT JOIN dones x USING (n)) AS dones;

-- name: ui_runners
-- The dashboard's runner table: every runner principal $1 owns with its liveness lease,
-- diagnostics, backlog (live unclaimed wakes, the undelivered ones, the oldest's age), active
-- claims and parked entities, one statement.
WITH mine AS (
    SELECT r.id, r.owner_principal, r.label, r.kind, r.admin_status, r.created_at, r.updated_at,
           l.last_seen_at, l.lease_expires_at, l.diagnostics
    FROM runners r LEFT JOIN runner_liveness l ON l.runner_id = r.id
    WHERE r.owner_principal = $1
), backlog AS (
    SELECT w.runner_id, count(*)::integer AS outstanding_wakes,
        count(*) FILTER (WHERE w.delivery_status = 'queued')::integer AS undelivered_wakes,
        extract(epoch FROM now() - min(w.created_at))::float8 AS oldest_wake_age_s
    FROM wakes w JOIN mine m ON m.id = w.runner_id
    WHERE w.claim_status = 'unclaimed' AND w.delivery_status IN ('queued', 'delivered')
    GROUP BY w.runner_id
), active AS (
    SELECT d.active_runner_id AS runner_id, count(*)::integer AS active_claims
    FROM dispatch_state d JOIN mine m ON m.id = d.active_runner_id
    WHERE d.active_claim_id IS NOT NULL
    GROUP BY d.active_runner_id
), parked AS (
    SELECT e.target_runner_id AS runner_id, count(*)::integer AS parked_entities
    FROM entities e JOIN mine m ON m.id = e.target_runner_id
    JOIN dispatch_state d ON d.entity_url = e.url
    WHERE d.parked_reason IS NOT NULL
    GROUP BY e.target_runner_id
)
SELECT m.*, now() AS now,
    coalesce(b.outstanding_wakes, 0) AS outstanding_wakes,
    coalesce(b.undelivered_wakes, 0) AS undelivered_wakes, b.oldest_wake_age_s,
    coalesce(a.active_claims, 0) AS active_claims,
    coalesce(p.parked_entities, 0) AS parked_entities
FROM mine m
LEFT JOIN backlog b ON b.runner_id = m.id
LEFT JOIN active a ON a.runner_id = m.id
LEFT JOIN parked p ON p.runner_id = m.id
ORDER BY m.id;

-- name: ui_runner
-- The dashboard's runner page: the runner $1 with its liveness lease, backlog, active claims,
-- parked entities and its latest $2 wakes (newest first, as JSON), one statement; the caller
-- checks the owner.
SELECT r.id, r.owner_principal, r.label, r.kind, r.admin_status, r.created_at, r.updated_at,
    l.last_seen_at, l.lease_expires_at, l.diagnostics, now() AS now,
    (SELECT count(*) FROM wakes w WHERE w.runner_id = r.id AND w.claim_status = 'unclaimed'
        AND w.delivery_status IN ('queued', 'delivered'))::integer AS outstanding_wakes,
    (SELECT count(*) FROM wakes w WHERE w.runner_id = r.id AND w.claim_status = 'unclaimed'
        AND w.delivery_status = 'queued')::integer AS undelivered_wakes,
    (SELECT extract(epoch FROM now() - min(w.created_at))::float8 FROM wakes w
        WHERE w.runner_id = r.id AND w.claim_status = 'unclaimed'
        AND w.delivery_status IN ('queued', 'delivered')) AS oldest_wake_age_s,
    (SELECT count(*) FROM claims c WHERE c.runner_id = r.id AND c.status = 'active')::integer
        AS active_claims,
    (SELECT count(*) FROM dispatch_state d JOIN entities e ON e.url = d.entity_url
        WHERE e.target_runner_id = r.id AND d.parked_reason IS NOT NULL)::integer
        AS parked_entities,
    -- The latest wakes of the entities that target the runner (entities_target_runner, then
    -- each entity's latest by its (entity_url, epoch) key): wakes has no index by runner
    -- beyond the outstanding ones.
    (SELECT coalesce(json_agg(x ORDER BY x.created_at DESC), '[]'::json) FROM (
        SELECT w.id, w.entity_url, w.epoch, w.reason, w.delivery_status, w.claim_status,
            w.stream_entry_id, w.attempts, w.created_at,
            extract(epoch FROM now() - w.created_at)::float8 AS age_s
        FROM entities e
        CROSS JOIN LATERAL (
            SELECT * FROM wakes w1 WHERE w1.entity_url = e.url AND w1.runner_id = r.id
            ORDER BY w1.epoch DESC LIMIT $2) w
        WHERE e.target_runner_id = r.id
        ORDER BY w.created_at DESC LIMIT $2) x
    ) AS recent_wakes
FROM runners r LEFT JOIN runner_liveness l ON l.runner_id = r.id
WHERE r.id = $1;

-- name: ui_entity
-- The dashboard's entity page: the entity $1 with its dispatch state, the active claim's lease
-- left, and its story (the latest $2 messages, wakes, claims and events, as JSON, newest
-- first), one statement; the caller checks membership.
SELECT e.url, e.type, e.id, e.status, e.target_runner_id, e.created_by, e.members, e.created_at,
    d.tail_offset, d.acked_offset, d.epoch, d.outstanding_wake_id, d.active_claim_id,
    d.active_runner_id, d.active_epoch, d.active_lease_expires_at,
    extract(epoch FROM d.active_lease_expires_at - now())::float8 AS lease_left_s,
    d.parked_reason, d.failed_attempts, d.last_error, now() AS now,
    (SELECT coalesce(json_agg(t ORDER BY t.at DESC, t.kind), '[]'::json) FROM (
        (SELECT 'message' AS kind, m.created_at AS at, 'offset ' || m."offset" AS title,
            'from ' || m.sender || ': ' || left(m.payload::text, 200) AS detail
         FROM inbox_messages m WHERE m.entity_url = e.url
         ORDER BY m."offset" DESC LIMIT $2)
        UNION ALL
        (SELECT 'wake', w.created_at, 'wake ' || w.id || ' epoch ' || w.epoch,
            w.reason || ': ' || w.delivery_status || '/' || w.claim_status
            || coalesce(' to ' || w.runner_id, '')
         FROM wakes w WHERE w.entity_url = e.url ORDER BY w.epoch DESC LIMIT $2)
        UNION ALL
        (SELECT 'claim', c.claimed_at, 'claim ' || c.id || ' epoch ' || c.epoch,
            c.status || coalesce(' (' || c.end_reason || ')', '')
            || coalesce(' by ' || c.runner_id, '')
            || coalesce(', acked ' || c.acked_offset, '')
            || coalesce(': ' || c.last_error, '')
         FROM wakes cw JOIN claims c ON c.id = cw.id  -- claims.id is its wake's id
         WHERE cw.entity_url = e.url ORDER BY cw.epoch DESC LIMIT $2)
        UNION ALL
        (SELECT 'event', ev.created_at, 'event ' || ev."offset",
            'from ' || ev.sender || coalesce(' (claim ' || ev.claim_id || ')', '') || ': '
            || left(ev.payload::text, 200)
         FROM entity_events ev WHERE ev.entity_url = e.url
         ORDER BY ev."offset" DESC LIMIT $2)
    ) t) AS timeline
FROM entities e JOIN dispatch_state d ON d.entity_url = e.url WHERE e.url = $1;
