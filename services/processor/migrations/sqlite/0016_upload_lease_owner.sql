-- Who holds an upload's lease: a random token written by each claim. A sender's failed
-- attempt, its retry, its lease renewal and its release match it, so a sender whose lease ran
-- out while it sent a large file, and was taken by another claim, neither records a failure
-- over the new holder's delivery nor frees the upload while the new holder sends.
ALTER TABLE uploads ADD COLUMN lease_owner TEXT;
