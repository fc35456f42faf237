-- When each host's agent certificate stops being valid (set at enrolment), so that the control
-- plane can say when it must be renewed.
ALTER TABLE agent_status ADD COLUMN certificate_expires_at INTEGER;
