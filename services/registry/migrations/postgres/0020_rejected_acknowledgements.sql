-- The acknowledgements the registry rejected that it recorded an ACKNOWLEDGEMENT_REJECTED
-- event for, by their key: a processor's retries of the same acknowledgement find their key
-- here and record no other event.
CREATE TABLE rejected_acknowledgements (
    request_id TEXT NOT NULL,
    processor TEXT NOT NULL,
    subprocessor TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    rejected_at BIGINT NOT NULL,
    PRIMARY KEY (request_id, processor, subprocessor, sequence)
);

-- Why the last status check (GetStatus) of a quiet request at the processor failed, and
-- when; cleared when one answers. GetChain shows it to operators.
ALTER TABLE processor_chain ADD COLUMN status_error TEXT;
ALTER TABLE processor_chain ADD COLUMN status_error_at BIGINT;
