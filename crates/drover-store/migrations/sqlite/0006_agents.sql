-- Agent enrolment (issue 11): a token's record, never the token (see drover_pki). One-time: a
-- successful enrolment sets consumed_at with a conditional update.
CREATE TABLE agent_enrolments (
    token_hash  TEXT PRIMARY KEY,
    host_id     TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    consumed_at INTEGER
);
CREATE INDEX agent_enrolments_host ON agent_enrolments (host_id);

-- What the control plane knows of each host's agent: when it enrolled, when it was last reached,
-- and why the last attempt failed.
CREATE TABLE agent_status (
    host_id     TEXT PRIMARY KEY,
    enrolled_at INTEGER,
    last_seen   INTEGER,
    last_error  TEXT
);
