-- A subject's later requests find the billing records an erasure kept, by the buyer's e-mail
-- address as billed. The address is part of the record the law keeps (it is in `buyer`);
-- this column holds it apart, lowercased, so that it can be compared and hashed. Records
-- written before this migration take it from `buyer` (`name <address>`): what the last '<'
-- and the closing '>' enclose (a name may hold a '<' too).
ALTER TABLE billing_records ADD COLUMN buyer_email TEXT;
UPDATE billing_records
    SET buyer_email = lower(substring(buyer from '<([^<>]*)>$'))
    WHERE buyer ~ '<[^<>]*>$';
CREATE INDEX billing_records_buyer_email ON billing_records (controller, buyer_email);

-- For a completed export of a subject: the ids of the kept billing records it covers
-- (comma-separated) besides the subscribers in `export_ids`. Ids only, as there.
ALTER TABLE adapter_tasks ADD COLUMN export_billing_ids TEXT;

-- An erasure answered ACCEPTED keeps in `retained_ids` the billing records an earlier
-- erasure of the same subject kept, which it answers for once carried out.
