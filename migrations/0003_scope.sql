-- The row scope (sessions.scope_value) of each audited change, so that an undo restores only
-- rows of its own scope when several clusters share one table. NULL: unscoped, or written
-- before this migration.
ALTER TABLE {{audit}} ADD COLUMN IF NOT EXISTS session_scope TEXT;
