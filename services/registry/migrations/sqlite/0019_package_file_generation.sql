-- Which registration of a file its row stands for: bumped by every restart (another header)
-- and every drop of its bytes. An upload stream remembers the generation it registered and
-- records a checkpoint, or the file stored, only while the row still has it, so a stream
-- whose file another replica registered again or dropped meanwhile records nothing for the
-- bytes now there.
ALTER TABLE package_files ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
