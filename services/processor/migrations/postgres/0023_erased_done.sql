-- A contract end task's counts by place in its phase, beside subjects_done and records_done:
-- what its erasure erased or anonymized so far per target and action, as the connector's
-- last recorded progress listed it (a JSON array of {"target", "action", "count"}), so that
-- the certificate of an erasure finished by a later call than one that failed or was cut
-- off lists the earlier calls' work by table. NULL or "[]": none listed (the phase's other
-- steps, a connector that does not count by place, or recorded before this column).
ALTER TABLE tasks ADD COLUMN erased_done TEXT;
