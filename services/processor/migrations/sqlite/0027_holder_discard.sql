-- A contract end task that will not go on (CANCELLED after its export began, or FAILED and its
-- request forgotten) whose holder is still to remove what the export recorded there for the
-- erasure after it (the SQL connector's keys of the returned rows): when the next call of the
-- connector's discard_bulk is due (ms since the epoch, the processor's clock), NULL when none
-- is; and how many calls failed so far, for their backoff. The forget worker's sweep makes the
-- calls and clears the column once one succeeds.
ALTER TABLE tasks ADD COLUMN holder_discard_at BIGINT;
ALTER TABLE tasks ADD COLUMN holder_discard_failures BIGINT NOT NULL DEFAULT 0;
CREATE INDEX tasks_holder_discard ON tasks (holder_discard_at)
    WHERE holder_discard_at IS NOT NULL;
-- Those that ended so before this release left their keys at the holder: due now. Only
-- exports started since 0021 are known (export_started_at); older ones stay unmarked.
-- CANCELLED = 9, FAILED = 7.
UPDATE tasks SET holder_discard_at = 0
WHERE export_started_at IS NOT NULL AND (state = 9 OR (state = 7 AND EXISTS (
    SELECT 1 FROM requests r WHERE r.controller = tasks.controller
      AND r.request_id = tasks.request_id AND r.forgotten_at IS NOT NULL
)));
