-- Forgetting: `forget_after_days` after the last task of a request reached a final state
-- (none RETAINED), the processor removes the raw identities and body (`body` becomes NULL),
-- the free text kept with the request and its tasks, and its export files, leaving the
-- keyed hashes of the identities in `identity_hashes` (a JSON array of HMAC-SHA256 hex
-- digests under the processor's `identity_hash_key`); `forgotten_at` records when.
ALTER TABLE requests ADD COLUMN identity_hashes TEXT;
ALTER TABLE requests ADD COLUMN forgotten_at BIGINT;
