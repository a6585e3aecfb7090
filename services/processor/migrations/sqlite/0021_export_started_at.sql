-- When the last call of a contract end's export started at the holder (ms since the epoch,
-- by the processor's clock), written right before the connector is called. The erasure that
-- follows a return is handed it with the returned counts, so that a holder able to ask what
-- changed since then refuses arrivals the counts do not show. NULL: no export call started.
ALTER TABLE tasks ADD COLUMN export_started_at BIGINT;
