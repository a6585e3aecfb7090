-- A contract end task that waits for the controller's confirmation of the returned data
-- (IN_PROGRESS = 2, AWAITING_CONFIRMATION = 3) now waits only until the grace period ends,
-- then deletes as without a choice. Those that began waiting before this release were put to
-- sleep for ever (next_attempt_at = i64::MAX): wake them at their grace end, as the task
-- machine now schedules new ones.
UPDATE tasks SET next_attempt_at = (
    SELECT c.grace_ends_at FROM contract_ends c
    WHERE c.controller = tasks.controller AND c.request_id = tasks.request_id
)
WHERE state = 2 AND contract_phase = 3 AND next_attempt_at = 9223372036854775807
  AND EXISTS (
    SELECT 1 FROM contract_ends c
    WHERE c.controller = tasks.controller AND c.request_id = tasks.request_id
  );
