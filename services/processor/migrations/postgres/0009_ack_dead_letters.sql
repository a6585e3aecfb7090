-- Acknowledgements the registry rejected: `rejections` counts its answers that named the row,
-- and after `acks.max_rejections` of them the row is dead-lettered (`dead_lettered_at`): never
-- sent again until an operator requeues it, never deleted. `last_error` holds the last
-- rejection, `rejected_at` when it came.
ALTER TABLE ack_outbox ADD COLUMN rejections INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ack_outbox ADD COLUMN rejected_at BIGINT;
ALTER TABLE ack_outbox ADD COLUMN dead_lettered_at BIGINT;
CREATE INDEX ack_outbox_dead_letters ON ack_outbox (dead_lettered_at) WHERE dead_lettered_at IS NOT NULL;
