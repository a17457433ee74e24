-- Retention: the pruner walks each table from its oldest finished rows; these indexes keep every
-- batch an index range scan instead of a sequential scan of a week of history.
CREATE INDEX wakes_resolved ON wakes (resolved_at) WHERE resolved_at IS NOT NULL;
CREATE INDEX inbox_messages_created ON inbox_messages (created_at);
CREATE INDEX entity_events_created ON entity_events (created_at);
