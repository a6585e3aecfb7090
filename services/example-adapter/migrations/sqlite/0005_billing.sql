-- The paid edition's billing records, which the law keeps after their subscriber is erased
-- (see src/retention.rs for the periods and legal bases). Times are milliseconds since the
-- Unix epoch.

-- One row per record a sale left: `kind` is 'invoice' (a voucher of the bookkeeping) or
-- 'vat-oss-sale' (a sale to a consumer in another member state, as the VAT One-Stop Shop
-- records it). `buyer` is the buyer as billed (name and e-mail address), which the record
-- keeps whatever happens to the subscriber. `kept_until` is the moment the law releases the
-- record, computed from `booked_at` when it is written. An erasure deletes the records
-- released by then and detaches the rest (`subscriber_id` NULL) before the subscriber goes;
-- the answer that kept them names them in `adapter_tasks.retained_ids`.
CREATE TABLE billing_records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    controller TEXT NOT NULL,
    subscriber_id BIGINT REFERENCES subscribers (id),
    kind TEXT NOT NULL,
    reference TEXT NOT NULL,
    buyer TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    booked_at BIGINT NOT NULL,
    kept_until BIGINT NOT NULL
);
CREATE INDEX billing_records_subscriber ON billing_records (subscriber_id);
CREATE INDEX billing_records_controller ON billing_records (controller, kept_until);

-- An erasure answered RETAINED: the billing records it kept (ids, comma-separated; none for a
-- bulk job, which keeps its controller's) and the date it answered, so that the retention
-- run at that date knows what to look at.
ALTER TABLE adapter_tasks ADD COLUMN retained_ids TEXT;
ALTER TABLE adapter_tasks ADD COLUMN retain_until BIGINT;
