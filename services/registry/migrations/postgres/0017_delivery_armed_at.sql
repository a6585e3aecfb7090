-- When an `extend` row was last armed (an operator's extension), for the outbox age gauge:
-- the request's own times say nothing about it (a FAILED request's finished_at is older, and
-- every acknowledgement moves updated_at).
ALTER TABLE deliveries ADD COLUMN armed_at BIGINT;
