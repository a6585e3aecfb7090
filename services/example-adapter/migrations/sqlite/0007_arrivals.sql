-- Arrivals since a contract end's export. The erasure that follows a return must erase only
-- what the export returned, so each subscriber, delivery and billing record gets an arrival
-- marker when it is inserted, and a bulk export keeps the marker it read (its pages read
-- and its counts count only rows up to it). A row whose marker is past the export's is an
-- arrival. The marker is set on insert, and again when the adapter's start gives a row
-- without a controller to the default one (`Store::assign_unowned`): a row changed otherwise
-- after the export (rectified, restricted, detached) keeps its marker and is no arrival, and
-- the erasure deletes it in its current form.
--
-- Row ids would do here: AUTOINCREMENT never reuses an id and SQLite has one writer at a
-- time, so id order is commit order. One counter over the three tables is used anyway so
-- that a snapshot is one number and the statements are the same as on PostgreSQL, whose
-- sequences are not commit-ordered (see the PostgreSQL migration). Rows from before this
-- migration get 0: older than any snapshot.
--
-- There a transaction that locks a row of these tables and then inserts into them can
-- deadlock with the erasure after a return, which takes the clock's lock first (see the
-- PostgreSQL migration); code that runs on both must insert first or take the clock first.
--
-- The markers live in the triggers below: a later migration that rebuilds subscribers,
-- deliveries or billing_records (create a new table, copy, drop, rename) drops their
-- trigger with the old table and must create it again on the new one, or rows inserted
-- after it carry no marker (0) and pass for returned.
CREATE TABLE arrival_clock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last BIGINT NOT NULL
);
INSERT INTO arrival_clock (id, last) VALUES (1, 0);

ALTER TABLE subscribers ADD COLUMN arrival BIGINT NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN arrival BIGINT NOT NULL DEFAULT 0;
ALTER TABLE billing_records ADD COLUMN arrival BIGINT NOT NULL DEFAULT 0;

-- A BEFORE trigger cannot set a column in SQLite, so the row is stamped just after.
CREATE TRIGGER subscribers_arrival AFTER INSERT ON subscribers BEGIN
    UPDATE arrival_clock SET last = last + 1;
    UPDATE subscribers SET arrival = (SELECT last FROM arrival_clock) WHERE id = NEW.id;
END;
CREATE TRIGGER deliveries_arrival AFTER INSERT ON deliveries BEGIN
    UPDATE arrival_clock SET last = last + 1;
    UPDATE deliveries SET arrival = (SELECT last FROM arrival_clock) WHERE id = NEW.id;
END;
CREATE TRIGGER billing_records_arrival AFTER INSERT ON billing_records BEGIN
    UPDATE arrival_clock SET last = last + 1;
    UPDATE billing_records SET arrival = (SELECT last FROM arrival_clock) WHERE id = NEW.id;
END;

-- For a completed contract-end export: the clock's value in the transaction that counted
-- it. NULL for exports from before this migration (the erasure after them compares totals).
ALTER TABLE adapter_tasks ADD COLUMN arrived_upto BIGINT;
