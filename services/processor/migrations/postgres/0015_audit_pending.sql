-- Audit entries written by a change's transaction and not chained yet. Transactions that
-- record entries insert them here without any lock, so they commit side by side; the
-- service's chainer (dsrelay_runtime::audit::table::chain_pending), holding a lock only
-- chainers take, moves the committed ones to audit_log in batches, in id order, giving each
-- its seq and hashes and deleting it here in the same transaction. Reads of the trail chain
-- what is here first. An entry is tamper-evident from its chaining on; until then it cannot
-- be changed (the trigger below), only deleted, which is what the chainer does.
-- SQLite has no such table: its one writer chains entries in the change's own transaction.
CREATE TABLE audit_pending (
    id BIGSERIAL PRIMARY KEY,
    occurred_at BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    event_type BIGINT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL
);

CREATE FUNCTION audit_pending_unchangeable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_pending entries cannot be changed';
END;
$$;
CREATE TRIGGER audit_pending_no_update BEFORE UPDATE ON audit_pending
    FOR EACH ROW EXECUTE FUNCTION audit_pending_unchangeable();
