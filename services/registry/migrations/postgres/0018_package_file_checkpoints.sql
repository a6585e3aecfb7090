-- How far a partly uploaded file was hashed: its first `checkpoint_bytes` bytes, stored and
-- made durable before this was written, and the SHA-256 midstate after them
-- (dsrelay_runtime::resumable_hash). A resumed upload takes the hashing up from there and
-- reads only the bytes stored after it, instead of the whole file within one call's time
-- limit. Both NULL until the first checkpoint; kept, unused, once the file is stored whole.
ALTER TABLE package_files ADD COLUMN checkpoint_bytes BIGINT;
ALTER TABLE package_files ADD COLUMN checkpoint_state BYTEA;
