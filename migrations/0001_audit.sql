-- The reconciler's audit table: one row per session it changed, enough to undo the change.
-- {{audit}}, {{sweep_idx}} and {{session_idx}} are replaced by quoted names derived from audit.table.
CREATE TABLE IF NOT EXISTS {{audit}} (
    id             BIGSERIAL PRIMARY KEY,
    sweep_id       UUID        NOT NULL,
    at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    action         TEXT        NOT NULL DEFAULT 'downgrade',
    session_table  TEXT        NOT NULL,
    session_key    TEXT        NOT NULL,
    object_name    TEXT,
    backend        TEXT,
    old_state      TEXT        NOT NULL,
    new_state      TEXT        NOT NULL,
    old_updated_at TIMESTAMPTZ,
    new_updated_at TIMESTAMPTZ,
    cleared        JSONB       NOT NULL DEFAULT '{}'::jsonb,
    reason         TEXT        NOT NULL,
    evidence       JSONB       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS {{sweep_idx}} ON {{audit}} (sweep_id);
CREATE INDEX IF NOT EXISTS {{session_idx}} ON {{audit}} (session_table, session_key, at);
