-- Subscribers per controller: the processor the adapter serves may send requests of several
-- controllers, and each one's subscribers are its own. The same address may be a subscriber
-- of two controllers, so e-mail addresses are unique per controller, not overall. Rows from
-- before this migration get controller '' and are assigned to the adapter's configured
-- default_controller when it starts (the migration cannot read the configuration).
--
-- SQLite cannot drop a UNIQUE constraint in place, so the table is rebuilt with the same ids.
-- Migrations run in a transaction with foreign keys on, so the deliveries that reference the
-- subscribers are set aside while the old table goes (dropping it runs an implicit DELETE,
-- which would break their references) and put back once the new one has its name.
CREATE TABLE subscribers_by_controller (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    controller TEXT NOT NULL DEFAULT '',
    email TEXT NOT NULL,
    name TEXT NOT NULL,
    phone TEXT,
    subscribed INTEGER NOT NULL DEFAULT 1,
    restricted INTEGER NOT NULL DEFAULT 0,
    UNIQUE (controller, email)
);
INSERT INTO subscribers_by_controller (id, email, name, phone, subscribed, restricted)
    SELECT id, email, name, phone, subscribed, restricted FROM subscribers;
CREATE TEMP TABLE deliveries_aside AS SELECT * FROM deliveries;
DELETE FROM deliveries;
DROP TABLE subscribers;
ALTER TABLE subscribers_by_controller RENAME TO subscribers;
CREATE INDEX subscribers_phone ON subscribers (phone);
INSERT INTO deliveries (id, subscriber_id, issue, sent_at, opened)
    SELECT id, subscriber_id, issue, sent_at, opened FROM deliveries_aside;
DROP TABLE deliveries_aside;

-- Bulk jobs (ExecuteBulk) are stored with the tasks, kind CONTRACT_END: the controller they
-- cover and the BulkOperation number. Execute's tasks keep their controller too, so that a
-- task id reused for another controller is refused.
ALTER TABLE adapter_tasks ADD COLUMN controller TEXT;
ALTER TABLE adapter_tasks ADD COLUMN operation BIGINT;
