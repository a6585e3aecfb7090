-- Tasks can wait for a holder's confirmation (handle), carry an export, and sleep as
-- RETAINED until their retain-until date, when the runner picks them up again.
ALTER TABLE tasks ADD COLUMN handle TEXT;
ALTER TABLE tasks ADD COLUMN export_json TEXT;
DROP INDEX tasks_runnable;
CREATE INDEX tasks_runnable ON tasks (next_attempt_at) WHERE state IN (1, 2, 5);
