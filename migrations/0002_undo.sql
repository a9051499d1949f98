-- Undo records point at the downgrade they reverse.
ALTER TABLE {{audit}} ADD COLUMN IF NOT EXISTS undoes BIGINT;
CREATE INDEX IF NOT EXISTS {{undoes_idx}} ON {{audit}} (undoes) WHERE undoes IS NOT NULL;
