-- When the last Start call of a contract end's export began at the holder (ms since the
-- epoch, by the processor's clock), written right before the connector is called, not by
-- confirmation polls: the connectors that read it run their export again whole on every
-- Start, so the last one's is the returned snapshot's. The erasure that follows a return is
-- handed it with the returned counts, so that a holder able to ask what changed since then
-- refuses arrivals the counts do not show. NULL: no export Start call began.
ALTER TABLE tasks ADD COLUMN export_started_at BIGINT;
