-- drover's first schema. Times are INTEGER milliseconds since the epoch (UTC); ids are UUID text.
-- Kept to SQL that PostgreSQL also takes (with BIGINT for INTEGER), so its migrations stay a copy.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    is_system   INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE users (
    id             TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL REFERENCES tenants(id),
    name           TEXT NOT NULL UNIQUE,
    role           TEXT NOT NULL,
    password_hash  TEXT NOT NULL,
    created_at     INTEGER NOT NULL
);

-- Bearer and refresh tokens, stored by the hash of their value only.
CREATE TABLE tokens (
    hash        TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,            -- 'access' | 'refresh'
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    family      TEXT NOT NULL,            -- one login's chain of refresh tokens
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,                  -- refresh tokens are single-use
    created_at  INTEGER NOT NULL
);
CREATE INDEX tokens_family ON tokens(family);

-- Inventory objects as typed documents. The columns are what is queried or constrained; the body
-- is the domain value as JSON. `version` guards read-modify-write cycles.
CREATE TABLE inventory (
    kind        TEXT NOT NULL,
    id          TEXT NOT NULL,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    name        TEXT NOT NULL,
    body        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (kind, id),
    UNIQUE (kind, tenant_id, name)
);

-- Which object refers to which; an object that is referred to cannot be deleted.
CREATE TABLE inventory_refs (
    from_kind  TEXT NOT NULL,
    from_id    TEXT NOT NULL,
    to_kind    TEXT NOT NULL,
    to_id      TEXT NOT NULL,
    PRIMARY KEY (from_kind, from_id, to_kind, to_id)
);
CREATE INDEX inventory_refs_to ON inventory_refs(to_kind, to_id);

CREATE TABLE sessions (
    id               TEXT PRIMARY KEY,
    tenant_id        TEXT NOT NULL REFERENCES tenants(id),
    kind             TEXT NOT NULL,
    name             TEXT NOT NULL,
    target_kind      TEXT NOT NULL,
    target_id        TEXT NOT NULL,
    state            TEXT NOT NULL,
    result           TEXT NOT NULL,
    progress         INTEGER NOT NULL,
    failure_message  TEXT,
    params           TEXT NOT NULL,
    halt_requested   INTEGER NOT NULL,
    halted           INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    ended_at         INTEGER
);
CREATE INDEX sessions_tenant_created ON sessions(tenant_id, created_at);
CREATE INDEX sessions_state ON sessions(state);
CREATE INDEX sessions_target ON sessions(target_id);

CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,
    session_id       TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    position         INTEGER NOT NULL,
    vm_id            TEXT,
    name             TEXT NOT NULL,
    state            TEXT NOT NULL,
    result           TEXT NOT NULL,
    progress         INTEGER NOT NULL,
    weight           INTEGER NOT NULL,
    failure_message  TEXT,
    created_at       INTEGER NOT NULL,
    ended_at         INTEGER
);
CREATE INDEX tasks_session ON tasks(session_id, position);

CREATE TABLE session_log (
    session_id  TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    task_id     TEXT,
    at          INTEGER NOT NULL,
    level       TEXT NOT NULL,
    message     TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE saga_steps (
    session_id  TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    task_id     TEXT,
    name        TEXT NOT NULL,
    state       TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    output      TEXT NOT NULL,
    error       TEXT,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (session_id, position)
);

-- Small named values of the installation (e.g. the self-signed certificate's fingerprint).
CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
