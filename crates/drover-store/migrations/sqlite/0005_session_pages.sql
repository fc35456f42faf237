-- Sessions listed page by page at tens of thousands (the EM dialect's collections and query
-- service). A tenant's sessions newest first, with their kind in the index, so a page of plan
-- sessions and the count beside it are read from the index alone (the old index was its prefix).
-- `name_lower` is the name lower-cased as Rust does it (Unicode; SQL's lower() is ASCII only),
-- written by the store, for filters and sorts that ignore case; rows older than this migration
-- get it when the store opens.
ALTER TABLE sessions ADD COLUMN name_lower TEXT;
DROP INDEX sessions_tenant_created;
CREATE INDEX sessions_tenant_created_kind ON sessions(tenant_id, created_at, id, kind);
CREATE INDEX sessions_tenant_name ON sessions(tenant_id, name_lower);
