-- A contract end's transfer recipient (ContractEnd.transfer_recipient): RETURN_THEN_DELETE
-- sends each task's export to it instead of to the registry. Where to reach it is in the
-- request's recipient columns (0006), as the registry configured it on Deliver or on the last
-- UpdateContractEnd that named it. Empty: the data is returned to the registry.
ALTER TABLE contract_ends ADD COLUMN transfer_recipient TEXT NOT NULL DEFAULT '';
