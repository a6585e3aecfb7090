-- Deliveries (and cancellations) the processor refused with a code retrying cannot change:
-- `refusals` counts them, and after `delivery.max_refusals` the row is dead-lettered
-- (`dead_lettered_at`): no longer sent, kept for operators, shown in Get.
ALTER TABLE deliveries ADD COLUMN refusals INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN dead_lettered_at BIGINT;
