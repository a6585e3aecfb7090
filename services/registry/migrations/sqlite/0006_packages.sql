-- Return-of-data packages. The files themselves live in the package store (a folder by
-- default); these tables record what was stored, so a package can be listed, checked and
-- expired without reading the files.

-- One row per request with at least one file registered: when the package began, and when
-- it was deleted for having outlived `package_ttl_days`.
CREATE TABLE packages (
    request_id TEXT PRIMARY KEY REFERENCES requests (id),
    created_at BIGINT NOT NULL,
    expired_at BIGINT
);

-- Every file a processor announced, as its header described it. `stored_at` is set once
-- every byte is stored and the whole file's SHA-256 matched.
CREATE TABLE package_files (
    request_id TEXT NOT NULL REFERENCES requests (id),
    processor TEXT NOT NULL,
    subprocessor TEXT NOT NULL,
    name TEXT NOT NULL,
    media_type TEXT NOT NULL,
    categories TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    stored_at BIGINT,
    PRIMARY KEY (request_id, processor, subprocessor, name)
);

-- One row per task whose part the processor declared complete (CompletePart).
CREATE TABLE package_parts (
    request_id TEXT NOT NULL REFERENCES requests (id),
    processor TEXT NOT NULL,
    subprocessor TEXT NOT NULL,
    files BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    stored_at BIGINT NOT NULL,
    PRIMARY KEY (request_id, processor, subprocessor)
);
