-- Who holds an acknowledgement's lease: a random token written by each claim and by the
-- runner's step that hands the row to its own sender. A sender's failed send, the registry's
-- rejection it records and its release at shutdown match it, so a sender whose lease ran out
-- while the registry was slow to answer, and whose rows another claim took, neither counts a
-- second rejection toward the dead letter nor frees the rows while the new holder sends.
ALTER TABLE ack_outbox ADD COLUMN lease_owner TEXT;
