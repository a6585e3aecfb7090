-- The dead letters that still need an operator: parked, not sent, not superseded. Marking
-- acknowledgements received (the sender's hot path) reads it to settle the earlier dead
-- letters of their tasks (supersede them, or requeue once one carrying a certificate), and
-- the gauge dsrelay_processor_acks_dead_lettered counts it. The index of 0009 holds
-- superseded dead letters too, which are kept and so only grow; this one is empty while no
-- dead letter waits for an operator, so that read costs nothing then, as long as nothing
-- makes the planner prefer another path (an ORDER BY id has SQLite walk the whole table in
-- id order instead; store::acks's plan tests check both databases). A row enters it only
-- when dead-lettered: queueing, claiming and sending acknowledgements do not write to it.
CREATE INDEX ack_outbox_parked ON ack_outbox (dead_lettered_at)
    WHERE dead_lettered_at IS NOT NULL AND sent_at IS NULL AND superseded_at IS NULL;
