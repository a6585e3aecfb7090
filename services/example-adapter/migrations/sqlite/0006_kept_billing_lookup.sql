-- A subject's later requests find the billing records an erasure kept by this key: the
-- buyer's e-mail address as billed, lowercased, held apart from `buyer` (which keeps it as
-- the law does) so that it can be compared and hashed. An erasure clears it where it could
-- name someone else (see src/retention.rs), so only records still linked to a subscriber
-- take it from `buyer` here: a record detached before cannot be told apart from one billed
-- at an address its subscriber gave up. `buyer` is `name <address>`; the key is what follows
-- its last '<' (the inner rtrim leaves `buyer` up to that '<', a name may hold one too),
-- less the closing '>'.
ALTER TABLE billing_records ADD COLUMN buyer_email TEXT;
UPDATE billing_records
    SET buyer_email = lower(rtrim(replace(buyer, rtrim(buyer, replace(buyer, '<', '')), ''),
                                  '>'))
    WHERE buyer LIKE '%<%>' AND subscriber_id IS NOT NULL;
CREATE INDEX billing_records_buyer_email ON billing_records (controller, buyer_email);

-- For a completed export of a subject: the ids of the kept billing records it covers
-- (comma-separated) besides the subscribers in `export_ids`. Ids only, as there.
ALTER TABLE adapter_tasks ADD COLUMN export_billing_ids TEXT;

-- An erasure answered ACCEPTED keeps in `retained_ids` the billing records an earlier
-- erasure of the same subject kept, which it answers for once carried out.
