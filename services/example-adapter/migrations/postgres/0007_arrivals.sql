-- Arrivals since a contract end's export. The erasure that follows a return must erase only
-- what the export returned, so each subscriber, delivery and billing record gets an arrival
-- marker when it is inserted, and a bulk export keeps the marker it read (its pages read
-- and its counts count only rows up to it). A row whose marker is past the export's is an
-- arrival. The marker is set on insert, and again when the adapter's start gives a row
-- without a controller to the default one (`Store::assign_unowned`): a row changed otherwise
-- after the export (rectified, restricted, detached) keeps its marker and is no arrival, and
-- the erasure deletes it in its current form.
--
-- Row ids will not do: identity columns take sequence values when a row is inserted, not
-- when it commits, so a row with a lower id can commit after a snapshot that read a higher
-- one and would pass for returned. The marker comes from a one-row counter instead: an
-- inserting transaction increments it once (remembering its transaction id there, so its
-- later rows take the same value) and holds the row's lock until it commits, so the next
-- transaction's value comes after that commit. A committed value N therefore means every
-- row marked up to N is committed, and one inserted later gets more than N. The price is
-- that inserting transactions run one after another, which the newsletter, whose requests
-- only change and delete rows, does not feel. Rows from before this migration get 0: older
-- than any snapshot.
--
-- Lock order: the erasure after a return takes the clock's lock first and then locks the
-- controller's rows as it deletes them; an insert takes the clock's lock at its first row. A
-- transaction that locks a row of these tables (an UPDATE, DELETE or SELECT ... FOR UPDATE)
-- and then inserts into them takes the two the other way round and can deadlock with such
-- an erasure (PostgreSQL then aborts one of them): insert first, or take the clock's lock
-- first (UPDATE arrival_clock SET last = last WHERE id = 1), as the erasure does.
CREATE TABLE arrival_clock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last BIGINT NOT NULL,
    xact BIGINT
);
INSERT INTO arrival_clock (id, last) VALUES (1, 0);

ALTER TABLE subscribers ADD COLUMN arrival BIGINT NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN arrival BIGINT NOT NULL DEFAULT 0;
ALTER TABLE billing_records ADD COLUMN arrival BIGINT NOT NULL DEFAULT 0;

CREATE FUNCTION stamp_arrival() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    marker BIGINT;
BEGIN
    SELECT last INTO marker FROM arrival_clock WHERE xact = txid_current();
    IF NOT FOUND THEN
        UPDATE arrival_clock SET last = last + 1, xact = txid_current()
            RETURNING last INTO marker;
    END IF;
    NEW.arrival := marker;
    RETURN NEW;
END
$$;
CREATE TRIGGER subscribers_arrival BEFORE INSERT ON subscribers
    FOR EACH ROW EXECUTE FUNCTION stamp_arrival();
CREATE TRIGGER deliveries_arrival BEFORE INSERT ON deliveries
    FOR EACH ROW EXECUTE FUNCTION stamp_arrival();
CREATE TRIGGER billing_records_arrival BEFORE INSERT ON billing_records
    FOR EACH ROW EXECUTE FUNCTION stamp_arrival();

-- For a completed contract-end export: the clock's value in the transaction that counted
-- it. NULL for exports from before this migration (the erasure after them compares totals).
ALTER TABLE adapter_tasks ADD COLUMN arrived_upto BIGINT;
