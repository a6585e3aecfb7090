-- When a request's cancellation (or its forgetting) took a delivery off the outbox before
-- the processor's acceptance was recorded: such a row is done but was never delivered, and
-- the views say CANCELLED rather than DELIVERED.
ALTER TABLE deliveries ADD COLUMN withdrawn_at BIGINT;
