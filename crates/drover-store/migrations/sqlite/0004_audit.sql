-- The audit log: logins and every mutating request of an authenticated caller. Append-only;
-- `seq` orders it (computed in the INSERT, like the session log's, so it stays portable).
CREATE TABLE audit_log (
    seq         INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    tenant_id   TEXT,
    user_id     TEXT,
    user_name   TEXT NOT NULL,
    action      TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    address     TEXT,
    detail      TEXT NOT NULL
);
CREATE INDEX audit_log_tenant ON audit_log(tenant_id, seq);
