-- When the task's current wait began (ms since the epoch, the processor's clock): set by the
-- step that leaves it waiting while it was not waiting already (handed to its operator,
-- WAITING_FOR_OPERATOR; PENDING or IN_PROGRESS put off until a retry, a holder marked
-- unreachable, work the holder accepted or a contract end's next phase), kept by the waits
-- that follow, cleared by a step that ends the wait. ListManualTasks' `waiting_since`.
ALTER TABLE tasks ADD COLUMN waiting_since BIGINT;
-- A task handed to its operator before this release has changed no more since (its next step
-- ends the wait), so its last change is when its wait began. WAITING_FOR_OPERATOR = 8. For
-- the other waits nothing stored says when they began: they stay unset until their next step.
UPDATE tasks SET waiting_since = updated_at WHERE state = 8;
