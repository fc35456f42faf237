-- Restore points: one row per point, its disks as JSON (a point's disks are written and read
-- together, never queried one by one).
CREATE TABLE restore_points (
    id             TEXT PRIMARY KEY,
    replica_id     TEXT NOT NULL,
    tenant_id      TEXT NOT NULL REFERENCES tenants(id),
    sequence       INTEGER NOT NULL,
    session_id     TEXT NOT NULL,
    state          TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    bytes_written  INTEGER NOT NULL,
    disks          TEXT NOT NULL,
    verified       INTEGER NOT NULL,
    UNIQUE (replica_id, sequence),
    UNIQUE (replica_id, session_id)
);
CREATE INDEX restore_points_replica ON restore_points(replica_id, sequence);
