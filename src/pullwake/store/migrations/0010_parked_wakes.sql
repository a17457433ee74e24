-- Recovery costs what changed, not the fleet.
--
-- A runner wake that re-delivery found unread (its entry is in the stream, but no session has
-- read that far: the runner is offline) is parked: parked_delivery_at takes the wake's
-- delivered_at, and re-delivery passes over the wake for as long as that publish stands.
-- Publishing the wake again (a new delivered_at) unparks it, and so does the worker when the
-- runner's stream shows a reader (a session connected, or the sweep sees the entry read).
-- Nothing else changes: the wake stays live and unclaimed, and a claim works as before.
ALTER TABLE wakes ADD COLUMN parked_delivery_at timestamptz;

-- Re-delivery's candidates, oldest first: the live unclaimed wakes that are not parked. An
-- offline fleet's parked wakes are not in it, so an idle pass reads an almost empty index.
CREATE INDEX wakes_redeliverable ON wakes (created_at)
    WHERE claim_status = 'unclaimed' AND delivery_status IN ('queued', 'delivered')
      AND (parked_delivery_at IS NULL OR parked_delivery_at <> delivered_at);
