-- Tenancy: runner ids stay with the principal that first registered them, entity types have an
-- owner, and entities name the principals they grant access to.

-- A runner id belongs to its first owner for good: deleting the runner keeps the reservation, so
-- a recycled id never reaches another principal (whose runner would then claim the old owner's
-- entities, which still target that id).
CREATE TABLE runner_id_owners (
    id               text PRIMARY KEY,
    owner_principal  text NOT NULL,
    reserved_at      timestamptz NOT NULL DEFAULT now()
);
INSERT INTO runner_id_owners (id, owner_principal)
SELECT id, owner_principal FROM runners;
-- Ids deleted before this migration: entities were created by their runner's owner.
INSERT INTO runner_id_owners (id, owner_principal)
SELECT DISTINCT ON (target_runner_id) target_runner_id, created_by FROM entities
WHERE target_runner_id IS NOT NULL
ORDER BY target_runner_id, created_at
ON CONFLICT (id) DO NOTHING;

-- NULL: created before owners existed; the next PUT takes it.
ALTER TABLE entity_types ADD COLUMN owner_principal text;
UPDATE entity_types t SET owner_principal = (
    SELECT e.created_by FROM entities e WHERE e.type = t.name ORDER BY e.created_at LIMIT 1);

-- Principals (besides the creator) that may read and send; '*' grants every principal.
ALTER TABLE entities ADD COLUMN members text[] NOT NULL DEFAULT '{}';
