-- One row per running worker process, written by the worker at every probe (about once per
-- recovery interval): what it can reach, which periodic jobs are failing and when one of its
-- periodic passes last succeeded. The API
-- reports these rows in /readyz and /metrics, so a worker that cannot work (or is gone) shows.
CREATE TABLE worker_status (
    worker_id        text PRIMARY KEY,
    host             text NOT NULL,
    pid              integer NOT NULL,
    interval_ms      integer NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now(),
    seen_at          timestamptz NOT NULL DEFAULT now(),
    redis_ok         boolean NOT NULL,
    failing_jobs     text[] NOT NULL DEFAULT '{}',
    last_recovery_at timestamptz
);
