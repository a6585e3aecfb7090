-- Forgetting: `forget_after_days` after a request finished, the registry removes its raw
-- identities and body (`body` becomes NULL) and the free text kept with it, leaving
-- `identity_hashes`; `forgotten_at` records when. Rows forgotten before this column existed
-- do not exist: nothing was ever forgotten before it.
ALTER TABLE requests ADD COLUMN forgotten_at BIGINT;
CREATE INDEX requests_to_forget ON requests (finished_at) WHERE forgotten_at IS NULL;
