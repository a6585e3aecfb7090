-- Exports are written as files in the processor's data folder; a task keeps only the list
-- of its files (JSON: name, media type, data categories, size, SHA-256), never their content.
ALTER TABLE tasks ADD COLUMN export_files TEXT;
ALTER TABLE tasks DROP COLUMN export_json;
