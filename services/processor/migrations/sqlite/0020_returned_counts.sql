-- What a contract end returned at a holder: the done counts (subjects, records) of its
-- export's last progress, written when the controller's confirmation releases the erasure
-- (the task's own counts then start again for the erasure). The erasure checks the holder
-- against them before it erases anything. NULL: nothing was returned before the erasure.
ALTER TABLE tasks ADD COLUMN returned_subjects BIGINT;
ALTER TABLE tasks ADD COLUMN returned_records BIGINT;
