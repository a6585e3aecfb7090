-- The public keys a transfer's or a contract end's recipient signs its receipts with, as the
-- registry sent them (TransferRecipient.public_keys): their base64, space-separated, current
-- first. NULL or empty: none sent, and receipts are taken as the recipient answers them.
-- Kept when the request is forgotten: a public key says nothing of the subject.
ALTER TABLE requests ADD COLUMN recipient_public_keys TEXT;
