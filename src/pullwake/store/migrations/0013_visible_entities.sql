-- What a principal may see starts from its entities: those it created and those whose members
-- name it or everyone (`*`). The dashboard reads them on every refresh; with these indexes that
-- reads the principal's entities (a BitmapOr of the two), not the whole table. The membership
-- test is written `members && ARRAY[principal, '*']` where it should use the GIN index.
CREATE INDEX entities_created_by ON entities (created_by);
CREATE INDEX entities_members ON entities USING gin (members);
