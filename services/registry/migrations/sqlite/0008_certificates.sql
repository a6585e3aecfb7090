-- Deletion certificates processors sent with their acknowledgements, kept exactly as
-- signed, with the registry's verdict: `verified` is 1 only when the signature matched the
-- processor's configured public key and the body matched the acknowledgement; a rejected
-- one is kept (with why) so operators can see it, and certifies nothing.
CREATE TABLE certificates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    processor TEXT NOT NULL,
    subprocessor TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    certificate_id TEXT NOT NULL,
    body BLOB NOT NULL,
    signature BLOB NOT NULL,
    key_id TEXT NOT NULL,
    verified INTEGER NOT NULL,
    rejection TEXT NOT NULL DEFAULT '',
    received_at BIGINT NOT NULL,
    UNIQUE (request_id, processor, subprocessor, sequence)
);
