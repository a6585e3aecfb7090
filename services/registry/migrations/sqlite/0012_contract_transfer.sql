-- A contract end's transfer recipient (ContractEnd.transfer_recipient): the name in the
-- registry's `[[recipients]]` that RETURN_THEN_DELETE returns the data to instead of the
-- registry; empty when the data is returned to the registry as a package.
ALTER TABLE contracts ADD COLUMN transfer_recipient TEXT NOT NULL DEFAULT '';
