-- A contract end task waiting for the controller's confirmation of the returned data
-- (IN_PROGRESS = 2, AWAITING_CONFIRMATION = 3) now reports the grace end as its scheduled
-- time (it is deleted then, confirmed or not), and each phase counts its attempts from 1.
-- Those that began waiting before this release carry the schedule of the contract end's
-- start and the return's attempts: give them what the task machine now writes on entering
-- the phase.
UPDATE tasks SET
    scheduled_at = (
        SELECT c.grace_ends_at FROM contract_ends c
        WHERE c.controller = tasks.controller AND c.request_id = tasks.request_id
    ),
    attempts = 0
WHERE state = 2 AND contract_phase = 3
  AND EXISTS (
    SELECT 1 FROM contract_ends c
    WHERE c.controller = tasks.controller AND c.request_id = tasks.request_id
  );
