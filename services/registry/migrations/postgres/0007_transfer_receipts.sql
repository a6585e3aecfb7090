-- Transfers (GDPR art. 20(2)): the recipient's receipt for a TRANSFER task's part (an encoded
-- dsrelay.v1.TransferReceipt), as the processor's COMPLETED acknowledgement (or its status
-- report) carried it. NULL for every other task. Get, List and Watch show it in
-- evidence.transfer_receipt.
ALTER TABLE tasks ADD COLUMN transfer_receipt BYTEA;
