-- Subscribers per controller: the processor the adapter serves may send requests of several
-- controllers, and each one's subscribers are its own. The same address may be a subscriber
-- of two controllers, so e-mail addresses are unique per controller, not overall. Rows from
-- before this migration get controller '' and are assigned to the adapter's configured
-- default_controller when it starts (the migration cannot read the configuration).
ALTER TABLE subscribers ADD COLUMN controller TEXT NOT NULL DEFAULT '';
ALTER TABLE subscribers DROP CONSTRAINT subscribers_email_key;
ALTER TABLE subscribers ADD CONSTRAINT subscribers_controller_email_key UNIQUE (controller, email);
-- Bulk jobs (ExecuteBulk) are stored with the tasks, kind CONTRACT_END: the controller they
-- cover and the BulkOperation number. Execute's tasks keep their controller too, so that a
-- task id reused for another controller is refused.
ALTER TABLE adapter_tasks ADD COLUMN controller TEXT;
ALTER TABLE adapter_tasks ADD COLUMN operation BIGINT;
