-- When the processor's GetStatus first reported a dead letter's task at the dead letter's
-- sequence or later, after the row was parked: the registry has read that state
-- (or a later one) since the row was parked, so requeueing it is not needed. Set on rows
-- dead-lettered when the answer was given (never on one dead-lettered later), cleared when
-- the row is requeued or parked again. `superseded_at` is when the answer was given (ms, the
-- processor's clock). The gauge dsrelay_processor_acks_dead_lettered counts only rows where
-- it is unset.
ALTER TABLE ack_outbox ADD COLUMN superseded_at BIGINT;
