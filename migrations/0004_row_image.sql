-- The whole session row as it was when it was downgraded (every column, as jsonb), so that an
-- undo can insert the row back when the application has deleted it meanwhile. NULL: written
-- before this migration, or an undo record.
ALTER TABLE {{audit}} ADD COLUMN IF NOT EXISTS row_image JSONB;
