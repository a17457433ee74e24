-- pullwake initial schema: Postgres is the source of truth for every dispatch decision.

CREATE TABLE principals_tokens (
    id            text PRIMARY KEY,
    principal     text NOT NULL,
    token_hash    text NOT NULL UNIQUE,
    label         text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX principals_tokens_principal ON principals_tokens (principal);

CREATE TABLE runners (
    id               text PRIMARY KEY,
    owner_principal  text NOT NULL,
    label            text NOT NULL DEFAULT '',
    kind             text NOT NULL DEFAULT 'local'
                     CHECK (kind IN ('local', 'cloud-worker', 'sandbox', 'ci', 'server')),
    admin_status     text NOT NULL DEFAULT 'enabled' CHECK (admin_status IN ('enabled', 'disabled')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX runners_owner ON runners (owner_principal);

CREATE TABLE runner_liveness (
    runner_id         text PRIMARY KEY REFERENCES runners (id) ON DELETE CASCADE,
    last_seen_at      timestamptz NOT NULL,
    lease_expires_at  timestamptz NOT NULL,
    diagnostics       jsonb
);

CREATE TABLE entity_types (
    name                     text PRIMARY KEY,
    default_dispatch_policy  jsonb,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE entities (
    url              text PRIMARY KEY,
    type             text NOT NULL,
    id               text NOT NULL,
    status           text NOT NULL DEFAULT 'idle'
                     CHECK (status IN ('idle', 'running', 'paused', 'stopping', 'stopped', 'killed')),
    dispatch_policy  jsonb NOT NULL,
    -- denormalised from dispatch_policy so recovery can find a runner's entities by index
    target_runner_id text,
    tags             jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_by       text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (type, id)
);
CREATE INDEX entities_target_runner ON entities (target_runner_id) WHERE target_runner_id IS NOT NULL;

CREATE TABLE inbox_messages (
    entity_url       text NOT NULL REFERENCES entities (url) ON DELETE CASCADE,
    "offset"         bigint NOT NULL CHECK ("offset" >= 1),
    payload          jsonb NOT NULL,
    payload_bytes    integer NOT NULL,
    sender           text NOT NULL,
    idempotency_key  text,
    -- the send result, so that a retried send with the same key answers the same
    wake_id          text,
    wake_status      text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entity_url, "offset")
);
CREATE UNIQUE INDEX inbox_messages_idempotency
    ON inbox_messages (entity_url, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE entity_events (
    entity_url  text NOT NULL REFERENCES entities (url) ON DELETE CASCADE,
    "offset"    bigint NOT NULL CHECK ("offset" >= 1),
    payload     jsonb NOT NULL,
    sender      text NOT NULL,
    claim_id    text,
    idempotency_key text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entity_url, "offset")
);

CREATE TABLE dispatch_state (
    entity_url                   text PRIMARY KEY REFERENCES entities (url) ON DELETE CASCADE,
    tail_offset                  bigint NOT NULL DEFAULT 0,
    acked_offset                 bigint NOT NULL DEFAULT 0,
    events_tail_offset           bigint NOT NULL DEFAULT 0,
    epoch                        bigint NOT NULL DEFAULT 0,
    outstanding_wake_id          text,
    outstanding_wake_created_at  timestamptz,
    active_claim_id              text,
    active_epoch                 bigint,
    active_runner_id             text,
    active_token_hash            text,
    active_claimed_at            timestamptz,
    active_lease_expires_at      timestamptz,
    failed_attempts              integer NOT NULL DEFAULT 0,
    parked_reason                text,
    last_wake_id                 text,
    last_claimed_at              timestamptz,
    last_released_at             timestamptz,
    last_error                   text,
    updated_at                   timestamptz NOT NULL DEFAULT now(),
    CHECK (acked_offset >= 0 AND acked_offset <= tail_offset),
    -- a wake is never outstanding while a claim is active
    CHECK (outstanding_wake_id IS NULL OR active_claim_id IS NULL),
    CHECK ((active_claim_id IS NULL) = (active_epoch IS NULL))
);
CREATE INDEX dispatch_state_lease ON dispatch_state (active_lease_expires_at)
    WHERE active_claim_id IS NOT NULL;
CREATE INDEX dispatch_state_outstanding ON dispatch_state (outstanding_wake_created_at)
    WHERE outstanding_wake_id IS NOT NULL;

CREATE TABLE wakes (
    id               text PRIMARY KEY,
    entity_url       text NOT NULL REFERENCES entities (url) ON DELETE CASCADE,
    epoch            bigint NOT NULL,
    target           jsonb NOT NULL,
    runner_id        text,
    reason           text NOT NULL,
    delivery_status  text NOT NULL DEFAULT 'queued'
                     CHECK (delivery_status IN ('queued', 'delivered', 'failed', 'superseded')),
    claim_status     text NOT NULL DEFAULT 'unclaimed'
                     CHECK (claim_status IN ('unclaimed', 'claimed', 'completed', 'expired')),
    stream_entry_id  text,
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    claimed_at       timestamptz,
    resolved_at      timestamptz,
    UNIQUE (entity_url, epoch)
);
-- invariant: at most one outstanding (unclaimed, live) wake per entity
CREATE UNIQUE INDEX wakes_one_outstanding ON wakes (entity_url)
    WHERE claim_status = 'unclaimed' AND delivery_status IN ('queued', 'delivered');
CREATE INDEX wakes_outstanding_by_runner ON wakes (runner_id, created_at)
    WHERE claim_status = 'unclaimed' AND delivery_status IN ('queued', 'delivered');

CREATE TABLE claims (
    id                 text PRIMARY KEY REFERENCES wakes (id) ON DELETE CASCADE,
    epoch              bigint NOT NULL,
    entity_url         text NOT NULL REFERENCES entities (url) ON DELETE CASCADE,
    runner_id          text,
    status             text NOT NULL DEFAULT 'active'
                       CHECK (status IN ('active', 'released', 'expired', 'failed')),
    token_hash         text NOT NULL UNIQUE,
    claimed_at         timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at  timestamptz,
    lease_expires_at   timestamptz NOT NULL,
    released_at        timestamptz,
    start_acked_offset bigint NOT NULL,
    acked_offset       bigint,
    end_reason         text,
    next_wake          boolean,
    last_error         text
);
-- invariant: at most one active claim per entity
CREATE UNIQUE INDEX claims_one_active ON claims (entity_url) WHERE status = 'active';
CREATE INDEX claims_runner_active ON claims (runner_id) WHERE status = 'active';
