-- Transfers (GDPR art. 20(2)): where a TRANSFER's data goes and the proof that it arrived.
--
-- The recipient the registry named when it delivered the request (DeliverRequest.recipient),
-- kept in columns of its own so the delivery worker finds it without decoding the body. All
-- three are NULL on other kinds, and on a TRANSFER the registry delivered without one.
ALTER TABLE requests ADD COLUMN recipient_name TEXT;
ALTER TABLE requests ADD COLUMN recipient_endpoint TEXT;
ALTER TABLE requests ADD COLUMN recipient_identity TEXT;

-- The recipient's receipt for a TRANSFER task's part (an encoded dsrelay.v1.TransferReceipt),
-- checked against what was sent and recorded with the task's COMPLETED step; every later
-- report of the task (GetStatus) carries it too.
ALTER TABLE tasks ADD COLUMN transfer_receipt BYTEA;

-- The upload outbox (0005) now holds the delivery of every export: to the controller's
-- registry for RETURN_OF_DATA, to the recipient for TRANSFER (the worker tells them apart by
-- the request's kind).
