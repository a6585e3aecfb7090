-- When the first Start call of a contract end's export began at the holder (ms since the
-- epoch, by the processor's clock), written right before the connector is called and kept
-- by later calls (an earlier time can only refuse more). The erasure that
-- follows a return is handed it with the returned counts, so that a holder able to ask what
-- changed since then refuses arrivals the counts do not show. NULL: no export call started.
ALTER TABLE tasks ADD COLUMN export_started_at BIGINT;
