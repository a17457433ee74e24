-- Dead letters are counted at every metrics scrape: keep that an index-only lookup.
CREATE INDEX wakes_failed ON wakes (created_at) WHERE delivery_status = 'failed';
