-- An operator's confirmation or refusal of a task holds the task while it writes the record
-- of a return done by hand and records its transition: a random token and until when (the
-- database's clock). A second operator's call, on this replica or another sharing the
-- database and the data folder, is answered ABORTED instead of replacing the file whose size
-- and SHA-256 the first one's transition records.
ALTER TABLE tasks ADD COLUMN operator_hold_until BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN operator_hold_by TEXT;
