-- The subprocessor list each processor last reported (an encoded SubprocessorList), so the
-- controller sees its whole processing chain even while a processor is unreachable.
CREATE TABLE processor_chain (
    processor TEXT PRIMARY KEY,
    subprocessors BLOB,
    reported_at BIGINT,
    last_error TEXT,
    checked_at BIGINT NOT NULL
);
